"""The training loop: optimizer steps over the run's batches, held-out evaluations that keep the
best weights, saved state for ``--resume``, the log and the progress lines.

It knows nothing of where the batches' loss comes from (:class:`~modelpress.train.student.StudentLoss`)
or how the weights are written (the ``save`` callable): :func:`modelpress.train.distill.distill`
builds both.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext

import torch

from modelpress.errors import UserError
from modelpress.eval.perplexity import evaluate
from modelpress.progress import fmt_seconds
from modelpress.train.data import BatchOrder
from modelpress.train.student import hidden_states
from modelpress.train.workdir import (Progress, Run, append_log, replace_dir, replace_with, saved_step, time_left,
                                      write_json)

logger = logging.getLogger("modelpress")


@torch.no_grad()
def sample_continuations(student, ids: torch.Tensor, config, m: int, rank: int) -> torch.Tensor:
    """The student's continuation of each window's first ``config.prompt_len`` tokens to the
    window's length: sampled at temperature 1 from the full distribution (GKD's on-policy data),
    seeded by the run's seed, the micro-batch and the process, so a resumed run samples the same."""
    torch.manual_seed(config.seed * 1_000_003 + m * 101 + rank)
    was_training = student.training
    student.eval()
    prompt = ids[:, :config.prompt_len]
    n_new = ids.shape[1] - config.prompt_len
    out = student.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                           top_k=0, top_p=1.0, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0)
    student.train(was_training)
    return out


class Trainer:
    """One run's loop on an ``accelerate.Accelerator`` (all processes run it; the main one writes)."""

    def __init__(self, accelerator, run: Run, config, progress: Progress, loss_module, optimizer, scheduler,
                 teacher, windows: torch.Tensor, order: BatchOrder, total: int, save, teacher_topk=None):
        self.acc, self.run, self.config, self.progress = accelerator, run, config, progress
        self.loss_module, self.optimizer, self.scheduler, self.teacher = loss_module, optimizer, scheduler, teacher
        self.teacher_topk = teacher_topk  # the teacher's precomputed rows instead of the teacher (teacher_topk)
        self.windows, self.order, self.total, self.save = windows, order, total, save
        self.main = accelerator.is_main_process
        self.student = accelerator.unwrap_model(loss_module).student
        self.tokens_per_step = config.tokens_per_step(accelerator.num_processes)
        self.eval_every = config.eval_every or max(1, total // 10)
        self.save_every = config.save_every or self.eval_every

    def train(self, eval_ids: torch.Tensor | None) -> None:
        """Steps until the budget is spent or evaluations stop improving; the best (or, without a
        held-out text, the last) weights end up in ``run.best``."""
        p = self.progress
        if eval_ids is not None and p.step == 0:
            p.start_ppl = self.evaluate(eval_ids)
            logger.info("step 0: held-out ppl %.3f", p.start_ppl)
            self.after_eval(p.start_ppl)
        loop_start, last_line, first_step = time.monotonic(), 0.0, p.step
        while p.step < self.total and not p.stopped_early:
            means = self.step(p.step)
            p.step += 1
            if not all(math.isfinite(v) for v in means.values()):
                raise UserError(f"the loss became NaN at step {p.step}; the last good state ({saved_step(self.run)}) "
                                f"is in {self.run.work}; lower --lr and start again")
            done = p.step - first_step
            rate = done * self.tokens_per_step / (time.monotonic() - loop_start)
            self.log({"step": p.step, "tokens": p.step * self.tokens_per_step, **means,
                      "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": rate})
            if self.main and (time.monotonic() - last_line > 2 or p.step == self.total):
                last_line = time.monotonic()
                logger.info("step %d/%d, loss %.4f (ce %.4f), %.0f tok/s, ETA %s", p.step, self.total, means["loss"],
                            means["ce"], rate, fmt_seconds(time_left(loop_start, done, self.total - first_step)))
            if eval_ids is not None and (p.step % self.eval_every == 0 or p.step == self.total):
                ppl = self.evaluate(eval_ids)
                logger.info("step %d: held-out ppl %.3f (best %.3f)", p.step, ppl, min(ppl, p.best_ppl))
                self.after_eval(ppl)
            if p.step % self.save_every == 0 and p.step < self.total and not p.stopped_early:
                self.save_state()
        if eval_ids is None and self.main:
            replace_with(self.run.best, self.save)
        self.acc.wait_for_everyone()

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; the mean loss terms over all processes."""
        config, acc = self.config, self.acc
        sums = torch.zeros(3, device=acc.device)
        for a in range(config.grad_accum):
            m = step * config.grad_accum + a
            rows = self.order.indices(m, acc.process_index)
            ids = self.windows[rows].to(acc.device)
            start = 0
            if config.on_policy(m):
                ids = sample_continuations(self.student, ids, config, m, acc.process_index)
                start = config.prompt_len - 1  # the loss covers the sampled tokens only
            h_t = None
            if self.teacher is not None:
                with torch.no_grad():
                    h_t = hidden_states(self.teacher, ids[:, :-1])
            elif self.teacher_topk is not None:
                h_t = self.teacher_topk.batch(rows).to(acc.device)
            with nullcontext() if a == config.grad_accum - 1 else acc.no_sync(self.loss_module):
                loss, ce, soft = self.loss_module(ids, h_t, start)
                acc.backward(loss / config.grad_accum)
            sums += torch.stack([loss.detach(), ce.detach(), soft.detach()]).float()
        if config.max_grad_norm is not None:
            acc.clip_grad_norm_(self.loss_module.parameters(), config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums = acc.reduce(sums, reduction="mean") / config.grad_accum
        return dict(zip(("loss", "ce", "soft"), sums.tolist()))

    def evaluate(self, eval_ids: torch.Tensor) -> float:
        """Held-out perplexity of the student as it runs (fake-quantized under QAT), on the main process."""
        from accelerate.utils import broadcast_object_list

        ppl = None
        if self.main:
            self.student.eval()
            ppl = evaluate(self.student, eval_ids, protocol=f"held-out-{self.config.seq_len}").ppl
            self.student.train()
        return broadcast_object_list([ppl])[0]

    def after_eval(self, ppl: float) -> None:
        p = self.progress
        self.log({"step": p.step, "eval_ppl": ppl})
        if p.best_ppl is None or ppl < p.best_ppl:
            p.best_ppl, p.best_step, p.bad_evals = ppl, p.step, 0
            if self.main:
                replace_with(self.run.best, self.save)
            self.acc.wait_for_everyone()
        else:
            p.bad_evals += 1
            p.stopped_early = p.bad_evals >= self.config.patience

    def save_state(self) -> None:
        tmp = self.run.work / "state.tmp"
        self.acc.save_state(str(tmp))
        if self.main:
            write_json(tmp / "trainer.json", {"config": self.config.model_dump(), "progress": self.progress.to_dict()})
            replace_dir(tmp, self.run.state)
        self.acc.wait_for_everyone()

    def log(self, entry: dict) -> None:
        if self.main:
            append_log(self.run.log, entry)
