"""The teacher's top-k logits, precomputed once, so the teacher is not resident while the student trains.

Logit distillation holds the teacher's weights beside the student's for the whole run. With
``--teacher-topk K`` the teacher instead scores every training window once, before training: of
each position's tempered distribution ``log p_T^τ`` only the K most likely tokens and their
log-probabilities are kept (DistillKit's "sparse logits"), and the teacher is freed. Training then
reads each batch's rows (:meth:`TopKTeacher.batch`) and
:func:`~modelpress.train.losses.topk_kd_sums` renormalizes them over the K kept.

Storage: ``windows x (seq_len - 1) x K`` log-probabilities (float32: float16's absolute error,
4e-3 at a log-probability of -6, shows in the loss) and token ids (int32), 8 bytes per entry:
100,000 tokens at K = 64 is 51 MB, against a teacher's whole weights. The file
(``teacher_topk.safetensors`` in the run's work folder) is reused by ``--resume``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from modelpress.progress import track

logger = logging.getLogger("modelpress")

FILE = "teacher_topk.safetensors"


class TopKTeacher:
    """The precomputed rows: ``values (n, T, k)`` float32 log-probabilities and ``ids (n, T, k)`` int32."""

    def __init__(self, values: torch.Tensor, ids: torch.Tensor):
        self.values, self.ids = values, ids

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.ids.numel() * self.ids.element_size()

    def batch(self, windows: torch.Tensor) -> torch.Tensor:
        """The rows of the windows at indices ``windows``, packed as
        :func:`~modelpress.train.losses.topk_kd_sums` takes them: ``(B, T, 2, k)`` float32."""
        return torch.stack([self.values[windows], self.ids[windows].float()], dim=2)

    def save(self, path: Path, k: int, temperature: float) -> None:
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + ".tmp")
        save_file({"values": self.values, "ids": self.ids}, str(tmp), metadata={"k": str(k), "temperature": str(temperature)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, k: int, temperature: float, shape: tuple[int, int]) -> TopKTeacher | None:
        """The rows saved at ``path`` for the same ``k``, ``temperature`` and windows, else ``None``."""
        from safetensors import safe_open

        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("k") != str(k) or meta.get("temperature") != str(temperature):
                return None
            values, ids = f.get_tensor("values"), f.get_tensor("ids")
        return cls(values, ids) if tuple(values.shape[:2]) == shape else None


@torch.no_grad()
def precompute(teacher, head, windows: torch.Tensor, k: int, temperature: float, batch_size: int,
               chunk_tokens: int) -> TopKTeacher:
    """The teacher's top ``k`` tokens of ``log_softmax(z / τ)`` at every position that predicts a
    next token of ``windows (n, T)``: rows ``(n, T - 1, k)``. Logits are made ``chunk_tokens`` at a
    time, so tokens x vocabulary never sits whole.

    Args:
        teacher: the causal LM (its last hidden state, :func:`~modelpress.train.student.hidden_states`).
        head: its LM head, hidden -> logits (the vocabulary already sliced to the student's).
    """
    from modelpress.train.student import hidden_states

    n, T = windows.shape
    values = torch.empty(n, T - 1, k, dtype=torch.float32)
    ids = torch.empty(n, T - 1, k, dtype=torch.int32)
    device = next(teacher.parameters()).device
    for b in track(range(0, n, batch_size), total=(n + batch_size - 1) // batch_size, what="teacher top-k batch"):
        h = hidden_states(teacher, windows[b:b + batch_size, :-1].to(device))
        flat = h.reshape(-1, h.shape[-1])
        v_rows, i_rows = [], []
        for c in range(0, flat.shape[0], chunk_tokens):
            log_p = F.log_softmax(head(flat[c:c + chunk_tokens]).float() / temperature, dim=-1)
            v, i = log_p.topk(k, dim=-1)
            v_rows.append(v.cpu())
            i_rows.append(i.cpu())
        rows = h.shape[0]
        values[b:b + rows] = torch.cat(v_rows).reshape(rows, T - 1, k)
        ids[b:b + rows] = torch.cat(i_rows).reshape(rows, T - 1, k).to(torch.int32)
    return TopKTeacher(values, ids)


def prepare(work: Path, teacher, t_vocab: int | None, windows: torch.Tensor, config, accelerator):
    """The teacher's top-k rows for every training window: computed by the main process (or read
    back from ``work`` on ``--resume``), then loaded by every process. Returns them and the
    record's entry."""
    from modelpress.errors import UserError
    from modelpress.train.student import logit_head

    head = logit_head(teacher)
    if t_vocab is not None:
        head = (lambda h, full=head: full(h)[..., :t_vocab])
    vocab = t_vocab or teacher.get_output_embeddings().weight.shape[0]
    k, path, shape = config.teacher_topk, work / FILE, (len(windows), windows.shape[1] - 1)
    if k > vocab:
        raise UserError(f"--teacher-topk {k} is more than the vocabulary ({vocab}); take at most {vocab}")
    t0 = time.monotonic()
    if accelerator.is_main_process and TopKTeacher.load(path, k, config.temperature, shape) is None:
        logger.info("scoring %d windows with the teacher once (its top %d logits), then training without it",
                    len(windows), k)
        precompute(teacher, head, windows, k, config.temperature, config.batch_size, config.chunk_tokens).save(
            path, k, config.temperature)
    accelerator.wait_for_everyone()
    rows = TopKTeacher.load(path, k, config.temperature, shape)
    return rows, {"k": k, "bytes": rows.nbytes, "seconds": round(time.monotonic() - t0, 1)}
