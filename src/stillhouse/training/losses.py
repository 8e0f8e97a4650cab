"""Distillation losses: tensors in, a scalar tensor out.

Conventions (shared by every loss here):
- ``student_logits`` is ``[B, T, V]``; ``labels`` is ``[B, T]`` and already aligned with the
  logits (position t is compared at position t; the caller shifts).
- Positions whose label equals ``ignore_index`` do not count; the result is the mean over counted
  positions, and 0 (not NaN) when none count.
- The teacher is either dense logits ``[B, T, V]`` or a `TopK` of ids ``[B, T, k]`` and log-probs
  ``[B, T, k]`` taken from its full distribution.
- Computation is in fp32 whatever the input dtype.

With a top-k teacher, ``tail="bucket"`` compares k+1 outcomes: the k teacher ids and one bucket
holding the rest of each distribution's mass. With k = V this equals the dense result.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# Largest log-mass allowed in the top-k before the tail bucket is taken: float16-stored teacher
# log-probs can sum to slightly more than 1, which would make the tail's log undefined.
_MAX_TOP_K_LOGMASS = -1e-6


class TopK(NamedTuple):
    """A teacher's top-k: ``ids`` ``[B, T, k]`` (int) and ``logprobs`` ``[B, T, k]`` from its full distribution."""

    ids: torch.Tensor
    logprobs: torch.Tensor


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Mächler, 2012)."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _masked_mean(per_position: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    mask = labels.ne(ignore_index)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def forward_kl(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopK,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
) -> torch.Tensor:
    """KL(p‖q) with p the teacher's and q the student's next-token distribution; scalar."""
    student_logprobs = student_logits.float().log_softmax(dim=-1)  # [B, T, V]
    if not isinstance(teacher, TopK):
        teacher_logprobs = teacher.float().log_softmax(dim=-1)  # [B, T, V]
        per_position = F.kl_div(student_logprobs, teacher_logprobs, log_target=True, reduction="none").sum(-1)
        return _masked_mean(per_position, labels, ignore_index)

    teacher_top = teacher.logprobs.float()  # [B, T, k]
    student_top = student_logprobs.gather(-1, teacher.ids.long())  # [B, T, k]
    top_kl = (teacher_top.exp() * (teacher_top - student_top)).sum(-1)  # [B, T]
    teacher_tail = _log1mexp(teacher_top.logsumexp(-1).clamp(max=_MAX_TOP_K_LOGMASS))  # [B, T]
    student_tail = _log1mexp(student_top.logsumexp(-1).clamp(max=_MAX_TOP_K_LOGMASS))
    tail_kl = teacher_tail.exp() * (teacher_tail - student_tail)
    return _masked_mean(top_kl + tail_kl, labels, ignore_index)


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy over counted positions; 0 when none count. Scalar."""
    per_position = F.cross_entropy(
        student_logits.float().flatten(0, 1), labels.flatten().clamp(min=0), reduction="none"
    ).view_as(labels)
    return _masked_mean(per_position, labels, ignore_index)
