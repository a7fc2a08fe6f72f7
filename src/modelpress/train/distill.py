"""Logit distillation (and plain fine-tuning) of a whole model, on ``accelerate``.

The student trains on windows of the user's text; in ``logit`` mode the frozen teacher's
next-token distribution on the same windows is the target (EQ 7.2, :mod:`modelpress.train.losses`),
with ``alpha=0`` it is plain cross-entropy on the text (the baseline KD must beat).

One :class:`~accelerate.Accelerator` loop, so ``accelerate launch`` runs the same command on
several processes, GPUs or nodes (DDP, FSDP): mixed precision, gradient accumulation and
``save_state``/``load_state`` are accelerate's. What the loop adds is what a compression tool
needs around it:

- **Logits in chunks.** The student's loss module (:class:`StudentLoss`, what accelerate wraps)
  returns hidden states through the model's own LM head a slice of tokens at a time
  (:func:`~modelpress.train.losses.chunked`); the teacher gives hidden states, not logits.
- **The same data for any process count** (:class:`~modelpress.train.data.BatchOrder`).
- **Held-out perplexity** every ``eval_every`` steps; the best weights are kept and training
  stops after ``patience`` evaluations without improvement.
- **Resume**: the run's state (model, optimizer, scheduler, RNG, step) is saved every
  ``save_every`` steps into ``OUT.partial``; ``resume=True`` continues from it and ends where an
  uninterrupted run would.
- **Nothing half-written**: ``OUT`` appears, complete, by one rename at the end; a NaN loss
  stops the run with the last good state kept in ``OUT.partial``.

Memory: the student (weights, gradients, AdamW's two moments: 16 bytes per parameter in float32)
plus the teacher's weights (``teacher_dtype``) plus one chunk of logits per model.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelpress.data import WindowProtocol, read_text, token_windows
from modelpress.errors import UserError
from modelpress.eval.perplexity import evaluate
from modelpress.models import loading
from modelpress.progress import fmt_seconds
from modelpress.record import record_header, to_json
from modelpress.train.data import BatchOrder, train_windows
from modelpress.train.student import StudentLoss, check_head, check_vocab, hidden_states, logit_head

logger = logging.getLogger("modelpress")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DistillConfig(BaseModel):
    """How a student is trained.

    YAML:
        mode: logit          # the teacher's distribution is the target; alpha 0: plain CE
        temperature: 1.0
        alpha: 1.0           # weight of the soft term; (1 - alpha) goes to CE on the text
        steps: 200           # or tokens: 400000
        lr: 1.0e-4
        seq_len: 512
        batch_size: 4        # per process
        grad_accum: 1
        eval_every: 50
        patience: 3

    Defaults follow Minitron (arXiv:2407.14679) for healing a pruned model: forward KL on the
    logits alone (alpha 1) at temperature 1, which the paper found better than adding CE or
    intermediate-state losses.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["logit"] = "logit"
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(1.0, ge=0, le=1)
    steps: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int | None = Field(None, ge=0)  # None: 5% of the steps
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seq_len: int = Field(512, ge=8)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    eval_every: int | None = Field(None, ge=1)  # None: 10 evaluations over the run
    eval_windows: int = Field(16, ge=1)
    patience: int = Field(3, ge=1)
    save_every: int | None = Field(None, ge=1)  # None: with every evaluation
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    chunk_tokens: int = Field(1024, ge=1)
    slice_teacher_vocab: bool = False

    @model_validator(mode="after")
    def _one_budget(self) -> DistillConfig:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give the budget as exactly one of steps or tokens")
        return self

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0

    def total_steps(self, world: int) -> int:
        """Optimizer steps: ``steps``, or enough to see ``tokens`` tokens over all processes."""
        if self.steps is not None:
            return self.steps
        per_step = self.seq_len * self.batch_size * self.grad_accum * world
        return max(1, math.ceil(self.tokens / per_step))

    def tokens_per_step(self, world: int) -> int:
        return self.seq_len * self.batch_size * self.grad_accum * world


@dataclass
class Progress:
    """What a resumed run needs besides accelerate's state (saved as ``trainer.json``)."""

    step: int = 0
    start_ppl: float | None = None
    best_ppl: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def has_accelerator() -> bool:
    """A GPU (or another torch accelerator) is present."""
    probe = getattr(torch, "accelerator", None)  # torch >= 2.6
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_json(data, indent=2))
    tmp.replace(path)


def append_log(path: Path, entry: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing it (the old one stays until the new one is complete)."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    if old.exists():
        shutil.rmtree(old)


def time_left(start: float, done: int, total: int) -> float:
    return (time.monotonic() - start) / max(done, 1) * (total - done)


class Run:
    """The work folder ``OUT.partial`` of one run: its saved state, best weights and log."""

    def __init__(self, out_dir: str | Path, resume: bool):
        self.out = Path(out_dir)
        self.work = self.out.with_name(self.out.name + ".partial")
        self.state, self.best, self.log = self.work / "state", self.work / "best", self.work / "train_log.jsonl"
        if self.out.exists():
            raise UserError(f"output {self.out} already exists; choose a new folder or remove it")
        if self.state.is_dir() and not resume:
            raise UserError(f"an interrupted run left {self.work}; add --resume to continue it, or delete it")
        if resume and not self.state.is_dir():
            logger.info("nothing to resume in %s; starting from step 0", self.work)
        self.resuming = resume and self.state.is_dir()

    def start(self, config: DistillConfig) -> Progress:
        """A fresh work folder, or the saved progress of the run being resumed (same config only)."""
        if not self.resuming:
            if self.work.exists():
                shutil.rmtree(self.work)
            self.work.mkdir(parents=True)
            return Progress()
        saved = json.loads((self.state / "trainer.json").read_text())
        if saved["config"] != config.model_dump():
            changed = sorted(k for k, v in config.model_dump().items() if saved["config"].get(k) != v)
            raise UserError(f"--resume needs the interrupted run's settings; changed: {', '.join(changed)}")
        progress = Progress(**saved["progress"])
        kept = [line for line in self.log.read_text().splitlines() if json.loads(line)["step"] <= progress.step]
        self.log.write_text("".join(line + "\n" for line in kept))  # what a killed run logged past its state
        return progress


def _save_weights(model, folder: Path, dtype: torch.dtype) -> None:
    """``model`` as a Hugging Face checkpoint in ``dtype``, written to ``folder.tmp`` then renamed."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    state = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp, state_dict=state)
    config = json.loads((tmp / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    replace_dir(tmp, folder)


def _setup_models(student: str, teacher: str | None, config: DistillConfig, device, probe: torch.Tensor):
    src = loading.resolve(student)
    model = loading.load_model(src, torch.float32, device=str(device))
    model.requires_grad_(True)
    check_head(model, probe.to(device), "student")
    t_model = t_vocab = None
    if config.needs_teacher:
        if teacher is None:
            raise UserError("logit distillation needs --teacher MODEL (or --alpha 0 for plain fine-tuning on the text)")
        t_model = loading.load_model(loading.resolve(teacher), DTYPES[config.teacher_dtype], device=str(device))
        t_model.requires_grad_(False)
        t_vocab = check_vocab(model, t_model, config.slice_teacher_vocab)
        check_head(t_model, probe.to(device), "teacher")
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return src, model, t_model, t_vocab


def distill(student: str, data: list[str], out_dir: str, config: DistillConfig, teacher: str | None = None,
            eval_text: str | None = None, resume: bool = False) -> dict:
    """Train ``student`` on ``data`` (against ``teacher`` in logit mode) and write it to ``out_dir``.

    Runs as one process, or as each of the processes ``accelerate launch`` starts.

    Returns:
        The run record (also written as ``OUT/modelpress.json``).
    """
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, set_seed

    start = time.monotonic()
    run = Run(out_dir, resume)
    # cpu=True on a machine without an accelerator, so that `torchrun`/`accelerate launch --multi_gpu`
    # processes there form one gloo group (accelerate only looks for CPU peers when told it is on CPUs)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not has_accelerator())
    main = accelerator.is_main_process
    set_seed(config.seed)
    tokenizer = loading.load_tokenizer(loading.resolve(student))
    windows = train_windows(tokenizer, data, config.seq_len)
    order = BatchOrder(len(windows), config.batch_size, accelerator.num_processes, config.seed)
    order.check(" + ".join(map(str, data)))
    eval_ids = None
    if eval_text is not None:
        eval_ids = token_windows(tokenizer, read_text(eval_text),
                                 WindowProtocol("held-out", config.seq_len, config.eval_windows))
    src, model, teacher_model, t_vocab = _setup_models(student, teacher, config, accelerator.device, windows[:1, :16])
    out_dtype = loading.load_config(src).dtype or torch.float32
    out_dtype = DTYPES.get(str(out_dtype).removeprefix("torch."), torch.float32)
    total = config.total_steps(accelerator.num_processes)
    eval_every = config.eval_every or max(1, total // 10)
    save_every = config.save_every or eval_every
    warmup = config.warmup_steps if config.warmup_steps is not None else total // 20
    if main:
        progress = run.start(config)
    accelerator.wait_for_everyone()
    if not main:
        progress = Progress(**json.loads((run.state / "trainer.json").read_text())["progress"]) if run.resuming \
            else Progress()

    from transformers import get_cosine_schedule_with_warmup

    loss_module = StudentLoss(model, config.temperature, config.alpha, config.chunk_tokens,
                              logit_head(teacher_model) if teacher_model is not None else None, t_vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # stepped by us once per optimizer step (accelerate's wrapper would step it once per process)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if run.resuming:
        accelerator.load_state(str(run.state))
        logger.info("resuming at step %d/%d", progress.step, total)
    unwrapped = accelerator.unwrap_model(loss_module).student

    def evaluate_now() -> float:
        ppl = None
        if main:
            unwrapped.eval()
            ppl = evaluate(unwrapped, eval_ids, protocol=f"held-out-{config.seq_len}").ppl
            unwrapped.train()
        return broadcast_object_list([ppl])[0]

    def log(entry: dict) -> None:
        if main:
            append_log(run.log, entry)

    def save_state() -> None:
        tmp = run.work / "state.tmp"
        accelerator.save_state(str(tmp))
        if main:
            write_json(tmp / "trainer.json", {"config": config.model_dump(), "progress": progress.to_dict()})
            replace_dir(tmp, run.state)
        accelerator.wait_for_everyone()

    def after_eval(ppl: float) -> None:
        log({"step": progress.step, "eval_ppl": ppl})
        if progress.best_ppl is None or ppl < progress.best_ppl:
            progress.best_ppl, progress.best_step, progress.bad_evals = ppl, progress.step, 0
            if main:
                _save_weights(unwrapped, run.best, out_dtype)
            accelerator.wait_for_everyone()
        else:
            progress.bad_evals += 1
            progress.stopped_early = progress.bad_evals >= config.patience

    if eval_ids is not None and progress.step == 0:
        progress.start_ppl = evaluate_now()
        logger.info("step 0: held-out ppl %.3f", progress.start_ppl)
        after_eval(progress.start_ppl)
    tokens_per_step = config.tokens_per_step(accelerator.num_processes)
    loop_start, last_line, first_step = time.monotonic(), 0.0, progress.step
    while progress.step < total and not progress.stopped_early:
        means = _train_step(accelerator, loss_module, optimizer, scheduler, teacher_model, windows, order,
                            progress.step, config)
        progress.step += 1
        if not all(math.isfinite(v) for v in means.values()):
            raise UserError(f"the loss became NaN at step {progress.step}; the last good state "
                            f"({_saved_step(run)}) is in {run.work}; lower --lr and start again")
        done = progress.step - first_step
        rate = done * tokens_per_step / (time.monotonic() - loop_start)
        log({"step": progress.step, "tokens": progress.step * tokens_per_step, **means,
             "lr": scheduler.get_last_lr()[0], "tokens_per_s": rate})
        if main and (time.monotonic() - last_line > 2 or progress.step == total):
            last_line = time.monotonic()
            logger.info("step %d/%d, loss %.4f (ce %.4f), %.0f tok/s, ETA %s", progress.step, total, means["loss"],
                        means["ce"], rate, fmt_seconds(time_left(loop_start, done, total - first_step)))
        if eval_ids is not None and (progress.step % eval_every == 0 or progress.step == total):
            ppl = evaluate_now()
            logger.info("step %d: held-out ppl %.3f (best %.3f)", progress.step, ppl, min(ppl, progress.best_ppl))
            after_eval(ppl)
        if progress.step % save_every == 0 and progress.step < total and not progress.stopped_early:
            save_state()
    if eval_ids is None and main:  # no held-out text: the last weights are the result
        _save_weights(unwrapped, run.best, out_dtype)
    accelerator.wait_for_everyone()
    record = None
    if main:
        record = _finish(run, src, teacher, data, config, tokenizer, progress, len(windows),
                         total, tokens_per_step, accelerator.num_processes, time.monotonic() - start)
    accelerator.wait_for_everyone()
    return record


def _saved_step(run: Run) -> str:
    try:
        return f"step {json.loads((run.state / 'trainer.json').read_text())['progress']['step']}"
    except OSError:
        return "none saved yet"


def _train_step(accelerator, loss_module, optimizer, scheduler, teacher, windows, order: BatchOrder, step: int,
                config: DistillConfig) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss terms (all processes)."""
    from contextlib import nullcontext

    sums = torch.zeros(3, device=accelerator.device)
    for a in range(config.grad_accum):
        m = step * config.grad_accum + a
        ids = windows[order.indices(m, accelerator.process_index)].to(accelerator.device)
        h_t = None
        if teacher is not None:
            with torch.no_grad():
                h_t = hidden_states(teacher, ids[:, :-1])
        sync = a == config.grad_accum - 1
        with nullcontext() if sync else accelerator.no_sync(loss_module):
            loss, ce, soft = loss_module(ids, h_t)
            accelerator.backward(loss / config.grad_accum)
        sums += torch.stack([loss.detach(), ce.detach(), soft.detach()]).float()
    if config.max_grad_norm is not None:
        accelerator.clip_grad_norm_(loss_module.parameters(), config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    sums = accelerator.reduce(sums, reduction="mean") / config.grad_accum
    return dict(zip(("loss", "ce", "soft"), sums.tolist()))


def _finish(run: Run, src, teacher, data, config: DistillConfig, tokenizer, progress: Progress, n_windows: int, total: int, tokens_per_step: int, world: int, elapsed_s: float) -> dict:
    """Complete ``OUT.partial/best`` (tokenizer, record, log) and rename it to ``OUT``."""
    tokenizer.save_pretrained(run.best)
    record = {
        **record_header(src, config, elapsed_s),
        "teacher": teacher,
        "data": {"files": [str(f) for f in data], "windows": n_windows, "tokens_per_window": config.seq_len},
        "processes": world,
        "steps": {"planned": total, "done": progress.step, "tokens": progress.step * tokens_per_step,
                  "stopped_early": progress.stopped_early},
        "held_out": None if progress.best_ppl is None else
        {"start_ppl": progress.start_ppl, "best_ppl": progress.best_ppl, "best_step": progress.best_step},
    }
    write_json(run.best / "modelpress.json", record)
    if run.log.exists():
        shutil.copy(run.log, run.best / "train_log.jsonl")
    run.best.rename(run.out)
    shutil.rmtree(run.work)
    return record
