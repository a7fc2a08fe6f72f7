"""The teacher's top-k logits, precomputed once, so the teacher is not resident while the student trains.

Logit distillation holds the teacher's weights beside the student's for the whole run. With
``--teacher-topk K`` the teacher instead scores once, before training, the windows the run's
steps will visit (a 3-step run scores its few batches, not the whole corpus): of
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
    """The precomputed rows of the windows ``used`` (ascending window indices): ``values (u, T, k)``
    float32 log-probabilities and ``ids (u, T, k)`` int32, row ``j`` for window ``used[j]``."""

    def __init__(self, values: torch.Tensor, ids: torch.Tensor, used: torch.Tensor):
        self.values, self.ids, self.used = values, ids, used

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.ids.numel() * self.ids.element_size()

    def batch(self, windows: torch.Tensor) -> torch.Tensor:
        """The rows of the windows at indices ``windows``, packed as
        :func:`~modelpress.train.losses.topk_kd_sums` takes them: ``(B, T, 2, k)`` float32."""
        wanted = torch.as_tensor(windows, dtype=self.used.dtype)
        rows = torch.searchsorted(self.used, wanted)
        if not torch.equal(self.used[rows.clamp(max=len(self.used) - 1)], wanted):
            raise RuntimeError("a batch asks for a window the teacher did not score")  # the run's order changed
        return torch.stack([self.values[rows], self.ids[rows].float()], dim=2)

    def save(self, path: Path, k: int, temperature: float) -> None:
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + ".tmp")
        save_file({"values": self.values, "ids": self.ids, "used": self.used}, str(tmp),
                  metadata={"k": str(k), "temperature": str(temperature)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, k: int, temperature: float, used: torch.Tensor, length: int) -> TopKTeacher | None:
        """The rows saved at ``path`` for the same ``k``, ``temperature``, windows ``used`` and
        window ``length``, else ``None``."""
        from safetensors import safe_open

        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("k") != str(k) or meta.get("temperature") != str(temperature):
                return None
            if "used" not in f.keys():
                return None
            values, ids, saved = f.get_tensor("values"), f.get_tensor("ids"), f.get_tensor("used")
        return cls(values, ids, saved) if torch.equal(saved, used) and values.shape[1] == length else None


@torch.no_grad()
def precompute(teacher, head, windows: torch.Tensor, used: torch.Tensor, k: int, temperature: float,
               batch_size: int, chunk_tokens: int) -> TopKTeacher:
    """The teacher's top ``k`` tokens of ``log_softmax(z / τ)`` at every position that predicts a
    next token of the windows ``used`` (ascending indices into ``windows (n, T)``): rows
    ``(len(used), T - 1, k)``. Logits are made ``chunk_tokens`` at a
    time, so tokens x vocabulary never sits whole.

    Args:
        teacher: the causal LM (its last hidden state, :func:`~modelpress.train.student.hidden_states`).
        head: its LM head, hidden -> logits (the vocabulary already sliced to the student's).
    """
    from modelpress.train.student import hidden_states

    windows = windows[used]
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
    return TopKTeacher(values, ids, used)


def prepare(work: Path, teacher, t_vocab: int | None, windows: torch.Tensor, used: list[int], config, accelerator):
    """The teacher's top-k rows for the training windows ``used`` (those the run's steps visit):
    computed by the main process (or read back from ``work`` on ``--resume``), then loaded by
    every process. Returns them and the record's entry."""
    from modelpress.errors import UserError
    from modelpress.train.student import logit_head

    head = logit_head(teacher)
    if t_vocab is not None:
        head = (lambda h, full=head: full(h)[..., :t_vocab])
    vocab = t_vocab or teacher.get_output_embeddings().weight.shape[0]
    k, path, length = config.teacher_topk, work / FILE, windows.shape[1] - 1
    used = torch.tensor(sorted(set(used)), dtype=torch.int64)
    if k > vocab:
        raise UserError(f"--teacher-topk {k} is more than the vocabulary ({vocab}); take at most {vocab}")
    t0 = time.monotonic()
    if accelerator.is_main_process and TopKTeacher.load(path, k, config.temperature, used, length) is None:
        logger.info("scoring the %d of %d windows the run visits with the teacher once (its top %d logits), "
                    "then training without it", len(used), len(windows), k)
        precompute(teacher, head, windows, used, k, config.temperature, config.batch_size, config.chunk_tokens).save(
            path, k, config.temperature)
    accelerator.wait_for_everyone()
    rows = TopKTeacher.load(path, k, config.temperature, used, length)
    return rows, {"k": k, "windows": len(used), "bytes": rows.nbytes, "seconds": round(time.monotonic() - t0, 1)}
