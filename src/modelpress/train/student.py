"""The student as one trainable module, and the checks that teacher and student fit together.

Training never asks a model for full logits: both models give their final hidden states, and
the loss runs them through each model's LM head a slice of tokens at a time
(:func:`modelpress.train.losses.chunked`). :func:`check_head` makes sure that this equals the
model's own logits, so an architecture with a logit transform this code does not know is refused
instead of trained on the wrong distribution.
"""

from __future__ import annotations

import torch

from modelpress.errors import UserError
from modelpress.train import losses


def logit_head(model) -> losses.Head:
    """Hidden states -> logits through ``model``'s LM head, with its final soft-cap if it has one."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)

    def forward(h: torch.Tensor) -> torch.Tensor:
        z = head(h)
        return torch.tanh(z / cap) * cap if cap else z

    return forward


def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """The final hidden states (after the last norm), ``(batch, T, d)``."""
    return model.base_model(input_ids=ids, use_cache=False).last_hidden_state


@torch.no_grad()
def check_head(model, ids: torch.Tensor, what: str) -> None:
    """Refuse a model whose logits are not ``head(hidden)``, as :func:`logit_head` computes them
    (a logit scale this code does not know of would silently change the loss)."""
    full = model(input_ids=ids, use_cache=False).logits.float()
    mine = logit_head(model)(hidden_states(model, ids)).float()
    if not torch.allclose(full, mine, atol=1e-3, rtol=1e-3):
        raise UserError(f"the {what}'s logits are not its LM head applied to its last hidden state "
                        f"(max difference {float((full - mine).abs().max()):.3g}); this architecture is not "
                        "supported for distillation yet")


class StudentLoss(torch.nn.Module):
    """The student and its loss, as one module: what ``accelerator.prepare`` wraps (DDP, FSDP),
    so that every student computation happens inside the wrapped forward.

    ``forward(ids, teacher_hidden)`` returns per-token means ``(loss, ce, soft)`` of EQ 7.2
    (:func:`modelpress.train.losses.kd_sums`); ``teacher_hidden=None`` with ``alpha=0`` is plain CE;
    with ``beta`` set, the loss is GKD's JSD(β) (:func:`modelpress.train.losses.jsd_sums`); with
    ``topk``, ``teacher_hidden`` is the teacher's precomputed top-k rows ``(B, T, 2, k)``
    (:func:`modelpress.train.losses.topk_kd_sums`).

    Args:
        student: a causal LM (trained).
        teacher_head: the teacher's :func:`logit_head`, or ``None``.
        teacher_vocab: keep the teacher's first ``teacher_vocab`` logits (padding rows sliced off), or ``None``.
    """

    def __init__(self, student, temperature: float, alpha: float, chunk_tokens: int,
                 teacher_head: losses.Head | None = None, teacher_vocab: int | None = None, beta: float | None = None,
                 topk: bool = False):
        super().__init__()
        self.student = student
        self.temperature, self.alpha, self.chunk_tokens, self.beta, self.topk = temperature, alpha, chunk_tokens, beta, topk
        self.teacher_head = teacher_head
        if topk:  # the teacher's rows come precomputed (teacher_topk): they go to the loss as they are
            self.teacher_head = lambda rows: rows
        elif teacher_head is not None and teacher_vocab is not None:
            self.teacher_head = lambda h: teacher_head(h)[..., :teacher_vocab]

    def forward(self, ids: torch.Tensor, teacher_hidden: torch.Tensor | None = None, start: int = 0):
        """Means over the predictions of tokens ``start + 1 ...`` of each window (0: all of them)."""
        h_s = hidden_states(self.student, ids[:, :-1])[:, start:]
        h_s = h_s.reshape(-1, h_s.shape[-1])
        h_t = None if teacher_hidden is None else teacher_hidden[:, start:].reshape(-1, *teacher_hidden.shape[2:])
        if self.topk:
            sums, kwargs = losses.topk_kd_sums, {"alpha": self.alpha}
        elif self.beta is None:
            sums, kwargs = losses.kd_sums, {"alpha": self.alpha}
        else:
            sums, kwargs = losses.jsd_sums, {"beta": self.beta}
        s = losses.chunked(sums, h_s, logit_head(self.student), ids[:, start + 1:].reshape(-1), h_t,
                           self.teacher_head, chunk_tokens=self.chunk_tokens, temperature=self.temperature, **kwargs)
        return s.loss / s.n, s.ce / s.n, s.soft / s.n


def vocab_sizes(student, teacher) -> tuple[int, int]:
    return student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]


def check_vocab(student, teacher, slice_teacher: bool) -> int | None:
    """The teacher's logit columns to keep (``None``: all); refuses vocabularies that differ."""
    n_s, n_t = vocab_sizes(student, teacher)
    if n_s == n_t:
        return None
    if slice_teacher and n_t > n_s:
        return n_s
    hint = (" (if the teacher's extra rows are padding, add --slice-teacher-vocab)" if n_t > n_s else "")
    raise UserError(f"logit distillation needs one vocabulary: the student has {n_s} tokens, the teacher {n_t}"
                    f"{hint}; for models with different tokenizers use sequence-level distillation")




def keep_zeros(model, min_fraction: float = 0.01) -> dict[str, float]:
    """Hold every exact zero of a pruned decoder Linear at zero while training: each weight with at
    least ``min_fraction`` exact zeros (a trained dense weight has essentially none) gets a gradient
    hook that masks them. Adam then never moves them (zero gradient, zero moments, zero step) and
    decoupled weight decay keeps 0 at 0, so the written weights have the same zeros.

    Returns:
        module name -> its fraction of zeros, for the record.
    """
    kept = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        plain = module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight
        mask = plain.detach() != 0
        fraction = 1.0 - mask.float().mean().item()
        if fraction >= min_fraction:
            plain.register_hook(lambda g, mask=mask: g * mask)
            kept[name] = round(fraction, 4)
    return kept
