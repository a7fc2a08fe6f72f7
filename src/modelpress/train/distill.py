"""Distillation, fine-tuning and QAT of a whole model, on ``accelerate``: the ``distill`` verb.

The student trains on windows of the user's text, in one of three modes:

- ``logit``: the frozen teacher's next-token distribution on the same windows is the target
  (EQ 7.2, :mod:`modelpress.train.losses`); ``alpha=0`` is plain cross-entropy on the text (the
  baseline KD must beat) and needs no teacher;
- ``sequence``: the teacher's continuations of the text are the text (:mod:`modelpress.train.sequence`);
- ``on-policy`` (GKD): a fraction of the micro-batches are the student's own continuations,
  scored token by token by the teacher with the generalized JSD.

The student keeps its kind (:func:`_student`): a float model stays float (or trains through
``qat``'s fake quantization), a compressed-tensors integer checkpoint trains through its own
formats from its stored scales, and a pruned model's zeros stay zero.

One :class:`~accelerate.Accelerator` loop (:class:`~modelpress.train.loop.Trainer`), so ``accelerate launch`` runs the same command on
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

import gc
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from modelpress.data import WindowProtocol, read_text, token_windows
from modelpress.errors import UserError
from modelpress.formats.floats import parse_format
from modelpress.formats.integer import IntFormat
from modelpress.models import loading
from modelpress.record import read_record, record_header
from modelpress.train import qat, teacher_topk
from modelpress.train.data import BatchOrder, train_windows
from modelpress.train.loop import Trainer
from modelpress.train.workdir import Progress, Run, has_accelerator, save_weights, write_json
from modelpress.train.student import StudentLoss, check_head, check_vocab, keep_zeros, logit_head

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

    mode: Literal["logit", "sequence", "on-policy"] = "logit"
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(1.0, ge=0, le=1)
    # on-policy (GKD): JSD(beta) between teacher and student; a fraction lmbda of the micro-batches
    # are the student's own continuations of the first prompt_tokens of a window.
    # sequence: the teacher's continuations of the same prompts are the student's training text
    beta: float = Field(0.5, ge=0, le=1)
    lmbda: float = Field(0.5, ge=0, le=1)
    prompt_tokens: int | None = Field(None, ge=1)  # None: half the window
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
    teacher_topk: int | None = Field(None, ge=1)  # precompute the teacher's top-k logits; not resident in training
    chunk_tokens: int = Field(1024, ge=1)
    slice_teacher_vocab: bool = False
    qat: str | None = None  # a weight format (int4-g128...): train through its fake quantization
    qat_scales: Literal["fixed", "learned"] = "fixed"  # learned: LSQ

    @field_validator("qat")
    @classmethod
    def _qat_format(cls, spec: str | None) -> str | None:
        if spec is not None:
            qat_kind(spec)
        return spec

    @model_validator(mode="after")
    def _one_budget(self) -> DistillConfig:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give the budget as exactly one of steps or tokens")
        if self.teacher_topk is not None and not (self.mode == "logit" and self.alpha > 0):
            raise ValueError("teacher_topk keeps the teacher's logits on the training text: it is for logit "
                             "distillation with alpha > 0 (on-policy and sequence modes need the teacher itself)")
        if self.qat is not None and self.qat_scales == "learned" and qat_kind(self.qat) == "gguf":
            raise ValueError("learned scales are for integer formats; a GGUF type keeps llama.cpp's block scales")
        return self

    @property
    def needs_teacher(self) -> bool:
        """The teacher's logits enter the loss (sequence mode uses the teacher before training only)."""
        return self.mode == "on-policy" or (self.mode == "logit" and self.alpha > 0)

    @property
    def prompt_len(self) -> int:
        """Tokens of a window kept as the prompt of an on-policy continuation (BOS included)."""
        return min(self.prompt_tokens or self.seq_len // 2, self.seq_len - 1)

    def on_policy(self, m: int) -> bool:
        """Whether micro-batch ``m`` is the student's own samples (a fixed draw per ``m`` and seed)."""
        if self.mode != "on-policy" or self.lmbda == 0:
            return False
        u = torch.rand((), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + m)).item()
        return u < self.lmbda

    def total_steps(self, world: int) -> int:
        """Optimizer steps: ``steps``, or enough to see ``tokens`` tokens over all processes."""
        if self.steps is not None:
            return self.steps
        per_step = self.seq_len * self.batch_size * self.grad_accum * world
        return max(1, math.ceil(self.tokens / per_step))

    def tokens_per_step(self, world: int) -> int:
        return self.seq_len * self.batch_size * self.grad_accum * world


def qat_kind(spec: str) -> Literal["int", "gguf"]:
    """``int`` for an integer weight format (compressed-tensors), ``gguf`` for a llama.cpp file type."""
    from modelpress.export.gguf_mix import FILE_TYPES, FLOAT_TYPES, file_type

    try:
        if isinstance(parse_format(spec), IntFormat):
            return "int"
    except (UserError, ValueError):
        pass
    try:
        name = file_type(spec)
    except UserError:
        name = None
    if name is not None and name not in FLOAT_TYPES and name in FILE_TYPES:
        return "gguf"
    raise ValueError(f"QAT fake-quantizes integer formats (int4-g128, int3-g64, int8-channel...) and GGUF types "
                     f"(q4_0, q4_k_m...); {spec} is not one")


def _student(src, config: DistillConfig, device):
    """The trainable student and how to write it, in the kind it came in (or ``--qat``'s).

    - a float checkpoint: trained as is, written as float; with ``config.qat``, trained through
      that format's fake quantization (RTN scales to start) and written as compressed-tensors;
    - a compressed-tensors integer checkpoint: trained through its own formats, starting from its
      stored codes and scales (QAT), and written back in them;
    - a GGUF file: trained through each tensor's own block type with the block params the file
      stores, and written as ``model.gguf`` with the same per-tensor types;
    - exact zeros of a float model (a pruned one): kept, their gradients masked (:func:`keep_zeros`);
      of a quantized one whose record says it was pruned (:func:`pruned_codes`): every zero code
      kept, since pruned weights and weights that rounded to zero look alike in the file.

    Returns:
        ``(model, save(model, folder, tokenizer), record entry)``.
    """
    from modelpress.export.compressed_tensors import read_quantized
    from modelpress.models.tensors import plan_targets
    from modelpress.pipeline.recipe import RTNConfig

    qc = loading.compressed_tensors_config(src)
    if qc and config.qat is not None:
        raise UserError(f"{src.path} is already quantized; drop --qat (it is trained in its own format), "
                        "or start from the float model")
    model = loading.load_model(src, torch.float32, device=str(device), dequantize=bool(qc))
    model.requires_grad_(True)
    out_dtype = DTYPES.get(str(loading.load_config(src).dtype).removeprefix("torch."), torch.float32)
    info = {"qat": None, "kept_zeros": None}
    side = Path(src.path) if src.kind == "folder" else None  # tokenizer and generation config, byte for byte
    save = lambda m, folder, tokenizer=None: save_weights(m, folder, out_dtype, tokenizer, side)  # noqa: E731
    start = read_quantized(src.path, qc) if qc else None
    if qc and not start:
        raise UserError(f"{src.path} holds no integer-quantized Linear that QAT can train (FP8/FP4 are not supported yet)")
    if src.kind == "gguf" or (config.qat is not None and qat_kind(config.qat) == "gguf"):
        from modelpress.export.gguf import GGUFLayout, layout_of_file, read_gguf_params
        from modelpress.export.gguf_mix import file_type

        if src.kind == "gguf":  # trained in the file's own types from its stored codes, written as GGUF again
            if config.qat is not None:
                raise UserError(f"{src.path} is already a GGUF file; drop --qat (it is trained in its own types)")
            layout = layout_of_file(src.path, model.config)
            blocks = read_gguf_params(src.path, layout)
        else:
            layout, blocks = GGUFLayout(model.config, file_type(config.qat)), None
        fakes = qat.attach_gguf(model, layout, start=blocks)
        save = lambda m, folder, tokenizer=None: qat.save_gguf(m, fakes, folder, layout, tokenizer, side)  # noqa: E731
        info["qat"] = {"formats": sorted({f.fmt.name for f in fakes.values()}), "file_type": layout.ftype,
                       "scales": "fixed (the file's)" if blocks is not None else
                       "fixed (llama.cpp's search on the starting weights)",
                       "start": "stored" if blocks is not None else "rtn", "layers": len(fakes)}
        start = start or blocks
    elif start or config.qat is not None:
        formats = {m: qt.fmt for m, qt in start.items()} if start else \
            plan_targets(model, RTNConfig(format=config.qat)).formats
        fakes = qat.attach(model, formats, config.qat_scales, start=start)
        names = set(loading.shard_index(src))
        save = lambda m, folder, tokenizer=None: qat.save_compressed(m, fakes, folder, out_dtype, names, tokenizer,  # noqa: E731
                                                                     side)
        info["qat"] = {"formats": sorted({f.name for f in formats.values()}), "scales": config.qat_scales,
                       "start": "stored" if start else "rtn", "layers": len(fakes)}
    # A float source's exact zeros are pruned weights. A quantized one's are also code 0 of its grid,
    # which QAT must be free to move, unless its record says it was pruned: then every zero code is
    # held, the pruned ones and those that rounded to zero alike (the file cannot tell them apart).
    if not start or pruned_codes(src):
        info["kept_zeros"] = keep_zeros(model) or None
    return model, save, info


def pruned_codes(src) -> bool:
    """Whether a quantized checkpoint's zero codes include pruned weights: its record says it was
    pruned in its layer pass, or quantized with the zeros of a pruned source kept."""
    record = read_record(src.path) if src.kind == "folder" else {}
    return bool(record.get("pruned") or (record.get("config") or {}).get("keep_zeros"))


def _teacher(teacher: str | None, config: DistillConfig, student, device, probe: torch.Tensor):
    if not config.needs_teacher:
        return None, None
    if teacher is None:
        raise UserError(f"{config.mode} distillation needs --teacher MODEL (or, in logit mode, --alpha 0 for plain "
                        "fine-tuning on the text)")
    t_model = loading.load_model(loading.resolve(teacher), DTYPES[config.teacher_dtype], device=str(device))
    t_model.requires_grad_(False)
    t_vocab = check_vocab(student, t_model, config.slice_teacher_vocab)
    check_head(t_model, probe.to(device), "teacher")
    return t_model, t_vocab


def _setup_models(student: str, teacher: str | None, config: DistillConfig, device, probe: torch.Tensor):
    src = loading.resolve(student)
    model, save, info = _student(src, config, device)
    check_head(model, probe.to(device), "student")
    t_model, t_vocab = _teacher(teacher, config, model, device, probe)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return src, model, t_model, t_vocab, save, info


def distill(student: str, data: list[str], out_dir: str, config: DistillConfig, teacher: str | None = None,
            eval_text: str | None = None, resume: bool = False) -> dict:
    """Train ``student`` on ``data`` (against ``teacher`` in logit mode) and write it to ``out_dir``.

    Runs as one process, or as each of the processes ``accelerate launch`` starts.

    Returns:
        The run record (also written as ``OUT/modelpress.json``).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    start = time.monotonic()
    run = Run(out_dir, resume)
    # cpu=True on a machine without an accelerator, so that `torchrun`/`accelerate launch --multi_gpu`
    # processes there form one gloo group (accelerate only looks for CPU peers when told it is on CPUs)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not has_accelerator())
    _check_sharding(accelerator.distributed_type.value)
    set_seed(config.seed)
    tokenizer = loading.load_tokenizer(loading.resolve(student))
    world = accelerator.num_processes
    windows, order = _windows(tokenizer, data, config, world, " + ".join(map(str, data)))
    eval_ids = None
    if eval_text is not None:
        eval_ids = token_windows(tokenizer, read_text(eval_text),
                                 WindowProtocol("held-out", config.seq_len, config.eval_windows))
    total = config.total_steps(world)
    if config.mode == "sequence" and teacher is None:
        raise UserError("sequence distillation needs --teacher MODEL (its continuations are the training text)")
    progress = _progress(run, config, accelerator)
    with run.cleanup_unless_saved():
        if config.mode == "sequence":
            corpus = _sequence_corpus(run, teacher, data, config, total * order.global_batch * config.grad_accum,
                                      accelerator)
            windows, order = _windows(tokenizer, [corpus], config, world, f"the teacher's corpus {corpus}")
        src, model, teacher_model, t_vocab, save, info = _setup_models(student, teacher, config, accelerator.device,
                                                                       windows[:1, :16])
    topk = None
    if config.teacher_topk is not None:  # score the windows once, then let the teacher go
        topk, info["teacher_topk"] = teacher_topk.prepare(run.work, teacher_model, t_vocab, windows,
                                                          order.visited(total * config.grad_accum), config, accelerator)
        teacher_model = None
        gc.collect()
    loss_module, optimizer, scheduler = _optimization(accelerator, model, teacher_model, t_vocab, config, total,
                                                      topk=topk is not None)
    if run.resuming:
        accelerator.load_state(str(run.state))
        logger.info("resuming at step %d/%d", progress.step, total)
    trainer = Trainer(accelerator, run, config, progress, loss_module, optimizer, scheduler, teacher_model,
                      windows, order, total, lambda folder: save(model, folder, tokenizer), teacher_topk=topk)
    trainer.train(eval_ids)
    record = None
    if accelerator.is_main_process:
        record = _finish(run, src, teacher, data, config, progress, len(windows), total, trainer.tokens_per_step,
                         accelerator.num_processes, time.monotonic() - start, info)
    accelerator.wait_for_everyone()
    return record


def _windows(tokenizer, files: list, config: DistillConfig, world: int, what: str) -> tuple[torch.Tensor, BatchOrder]:
    """The training windows of ``files`` and the order the processes see them in (checked to fill a batch)."""
    windows = train_windows(tokenizer, files, config.seq_len)
    order = BatchOrder(len(windows), config.batch_size, world, config.seed)
    order.check(what)
    return windows, order


def _progress(run: Run, config: DistillConfig, accelerator) -> Progress:
    """The main process starts (or resumes) the work folder; the others read where it stands."""
    if accelerator.is_main_process:
        progress = run.start(config)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        progress = Progress(**json.loads((run.state / "trainer.json").read_text())["progress"]) if run.resuming \
            else Progress()
    return progress


def _optimization(accelerator, model, teacher_model, t_vocab, config: DistillConfig, total: int, topk: bool = False):
    """The loss module (student and heads), AdamW and the cosine schedule, prepared by ``accelerator``;
    ``topk``: the teacher's precomputed top-k rows stand in for its hidden states."""
    from transformers import get_cosine_schedule_with_warmup

    alpha = config.alpha if config.mode == "logit" else 0.0  # sequence: CE on the teacher's text
    head = logit_head(teacher_model) if teacher_model is not None else None
    loss_module = StudentLoss(model, config.temperature, alpha, config.chunk_tokens, head, t_vocab,
                              beta=config.beta if config.mode == "on-policy" else None, topk=topk)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps if config.warmup_steps is not None else total // 20
    # stepped by us once per optimizer step (accelerate's wrapper would step it once per process)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    return loss_module, optimizer, scheduler


def _check_sharding(kind: str) -> None:
    """Refuse the sharded launch modes: every process holds the whole student here, and the best
    weights are written by the main process from its own copy (data parallel, DDP)."""
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise UserError(f"distill runs data-parallel (DDP: `accelerate launch --multi_gpu`, one or several "
                        f"nodes); {kind} sharding is not supported yet: launch without it")


def _sequence_corpus(run: Run, teacher: str, data: list[str], config: DistillConfig, n: int, accelerator):
    """The teacher's continuations (written once by the main process, reused on resume)."""
    from modelpress.train.sequence import teacher_corpus

    corpus = run.work / "teacher_corpus.jsonl"
    if accelerator.is_main_process and not corpus.exists():
        logger.info("teacher: generating %d continuations of %d tokens", n, config.seq_len + 1 - config.prompt_len)
        teacher_corpus(teacher, data, corpus, n, config.seq_len, config.prompt_len, config.batch_size, config.seed,
                       DTYPES[config.teacher_dtype], str(accelerator.device))
    accelerator.wait_for_everyone()
    return corpus


def _finish(run: Run, src, teacher, data, config: DistillConfig, progress: Progress, n_windows: int, total: int,
            tokens_per_step: int, world: int, elapsed_s: float, info: dict) -> dict:
    """Complete ``OUT.partial/best`` (record, log) and rename it to ``OUT``."""
    record = {
        **record_header(src, config, elapsed_s),
        "teacher": teacher,
        "data": {"files": [str(f) for f in data], "windows": n_windows, "tokens_per_window": config.seq_len},
        "processes": world,
        **info,
        "steps": {"planned": total, "done": progress.step, "tokens": progress.step * tokens_per_step,
                  "stopped_early": progress.stopped_early},
        "held_out": None if progress.best_ppl is None else
        {"start_ppl": progress.start_ppl, "best_ppl": progress.best_ppl, "best_step": progress.best_step},
    }
    write_json(run.best / "modelpress.json", record)
    for kept in (run.log, run.work / "teacher_corpus.jsonl"):  # the corpus: reusable with --alpha 0 --data
        if kept.exists():
            shutil.copy(kept, run.best / kept.name)
    run.best.rename(run.out)
    shutil.rmtree(run.work)
    return record
