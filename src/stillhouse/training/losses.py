"""Distillation losses: tensors in, a scalar tensor out.

    loss = distillation_loss(student_logits, TopK(ids, logprobs), labels, kind="jsd", beta=0.5, temperature=2.0)
    loss = distillation_loss_from_hidden(
        hidden, model.lm_head.weight, TopK(ids, logprobs), labels, kind="forward_kl", chunk_size=256
    )

Conventions (shared by every loss here):
- ``student_logits`` is ``[B, T, V]``; ``labels`` is ``[B, T]`` and already aligned with the
  logits (position t is compared at position t; the caller shifts).
- Positions whose label equals ``ignore_index`` do not count; the result is the mean over counted
  positions, and 0 (not NaN) when none count. Ignored positions are dropped before anything is
  computed, so whatever they hold (padding, NaN) cannot reach the loss or the gradients.
- The teacher is either dense logits ``[B, T, V]`` or a `TopK` of ids ``[B, T, k]`` and log-probs
  ``[B, T, k]`` taken from its full distribution at temperature 1. It is a constant: it gets no gradient.
- Computation is in fp32 whatever the input dtype.

Kinds, with p the teacher's and q the student's distribution, both at temperature τ, and every
result multiplied by τ² (so gradient sizes do not shrink as τ grows):

- ``forward_kl`` = KL(p‖q); ``reverse_kl`` = KL(q‖p);
- ``jsd`` = β·KL(p‖m) + (1−β)·KL(q‖m) with m = β·p + (1−β)·q, 0 < β < 1;
- ``skew_forward_kl`` = KL(p ‖ α·p + (1−α)·q); ``skew_reverse_kl`` = KL(q ‖ α·q + (1−α)·p), 0 < α < 1;
- ``tvd`` = ½·Σ|p − q|.

Log-probabilities are floored at ``-1e4`` before the divergence, so an outcome one side gives
probability 0 (a −inf logit) and the other does not costs a large finite amount instead of inf
or NaN; outcomes both sides give 0 (e.g. padded vocabulary rows set to −inf) cost nothing.

Top-k teachers are compared over one of two outcome sets:

- ``tail="bucket"``: k+1 outcomes, the k teacher ids and one bucket holding the rest of each
  distribution's mass. The teacher's bucket is 1 − Σ exp(log-probs) (0 if the stored log-probs sum
  to more than 1, as rounded fp16 values can); the student's is the exact mass of its other V − k
  tokens (summed, not 1 − Σ, so a confident student's small tail keeps its gradient). After
  temperature (below), both buckets get ``1e-8`` of extra mass and both distributions are
  renormalized, so neither bucket is ever empty (a teacher whose stored top-k sums to 1 would
  otherwise charge reverse KL the −1e4 floor on the student's bucket). With k = V there is nothing to
  bucket and the bucket is left out, so the result equals the dense one.
- ``tail="renormalize"``: k outcomes, both distributions renormalized over the k teacher ids.

How temperature is applied to a top-k teacher. The stored log-probs are at τ = 1, from the full
distribution; the teacher at τ would need its whole vocabulary, so:

- ``bucket``: the τ = 1 log-probs of the k+1 outcomes (k ids and the bucket's log-mass) are divided
  by τ and renormalized over the k+1 outcomes, for the teacher *and* for the student. The bucket is
  thereby tempered as if it were one token. Doing the same to the student keeps the loss 0 when
  student and teacher agree, at every τ. This equals the dense result at τ only when the bucket
  is empty (k = V) or holds one token, so it is exact only as k → V; for k < V and τ > 1 the bucket
  gets less weight than the tail would (Σ pᵢ^(1/τ) ≥ (Σ pᵢ)^(1/τ)), for τ < 1 more. At τ = 1
  nothing is approximated. Tempering also magnifies tiny buckets (1e-8 becomes 1e-4 at τ = 2),
  rounding noise in the teacher's stored log-probs included.
- ``renormalize``: the k log-probs are divided by τ and renormalized over the k ids (the student's
  k logits likewise). This is exact: it is the τ distribution restricted to the k ids, because
  the full distribution's normalizer cancels.

`distillation_loss_from_hidden` is the same loss computed from the last hidden state and the
LM-head weight, chunk by chunk over the counted positions, so the ``[B·T, V]`` student logits never
exist at once. Each chunk's gradients (w.r.t. the hidden state and the weight) are computed inside
the forward pass and kept, so the backward pass only scales them: no chunk is recomputed. With a
top-k teacher a chunk needs one ``[chunk, V]`` fp32 buffer: the logits become the softmax and then
the logits' gradient in place, because the student enters the loss only through its k+1 (or k)
outcome log-probs, whose gradient w.r.t. the logits is written out by hand (`_student_top_k_backward`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
TAILS = ("bucket", "renormalize")

# Log-probabilities are floored here so that 0·log(0/0) terms are 0 and 0-vs-nonzero terms are finite.
_LOG_FLOOR = -1e4
# Extra mass both sides' top-k tail buckets get (see the module docstring).
_TAIL_SMOOTHING = 1e-8


class TopK(NamedTuple):
    """A teacher's top-k: distinct ``ids`` ``[B, T, k]`` (int)
    and ``logprobs`` ``[B, T, k]`` from its full distribution."""

    ids: torch.Tensor
    logprobs: torch.Tensor


def distillation_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopK,
    labels: torch.Tensor,
    *,
    kind: str,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    tail: str = "bucket",
) -> torch.Tensor:
    """Divergence ``kind`` between teacher and student next-token distributions, × τ²; fp32 scalar.

    Args:
        student_logits: ``[B, T, V]``, any float dtype.
        teacher: dense logits ``[B, T, V]``, or `TopK` with ids and log-probs ``[B, T, k]``.
        labels: ``[B, T]``; positions equal to ``ignore_index`` don't count.
        kind: one of `KINDS` (see the module docstring for each formula).
        beta: the ``jsd`` mixture weight of the teacher, 0 < β < 1.
        alpha: the skew kinds' mixture weight, 0 < α < 1.
        temperature: τ > 0, applied to both distributions; the result is multiplied by τ².
        tail: how a top-k teacher's missing mass is handled: ``"bucket"`` or ``"renormalize"``.
    """
    loss = _Divergence(kind, beta, alpha, temperature, tail)
    _check_shapes(student_logits.shape[-1], student_logits.shape[:-1], teacher, labels, "student_logits")
    counted = labels.ne(ignore_index)
    student_rows = student_logits[counted].float()  # [N, V]
    if isinstance(teacher, TopK):
        teacher_rows = TopK(teacher.ids[counted].long(), teacher.logprobs[counted].detach())  # [N, k] each
        per_position = loss.top_k(
            *_StudentTopK.apply(student_rows, teacher_rows.ids), teacher_rows, student_rows.shape[-1]
        )
    else:
        per_position = loss.dense(student_rows, teacher[counted].detach())
    return temperature**2 * per_position.sum() / counted.sum().clamp(min=1)


def distillation_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher: torch.Tensor | TopK,
    labels: torch.Tensor,
    *,
    chunk_size: int,
    kind: str,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    tail: str = "bucket",
) -> torch.Tensor:
    """`distillation_loss` of the logits ``hidden @ lm_head_weight.T``, never holding them for all positions.

    Args:
        hidden: the student's last hidden state ``[B, T, H]``.
        lm_head_weight: ``[V, H]`` (no bias).
        chunk_size: counted positions per chunk; memory grows with ``chunk_size × V`` (one fp32
            buffer per chunk with a top-k teacher, a few with a dense one).
        Everything else as in `distillation_loss`. A dense teacher's logits are read chunk by chunk too.

    The weight's gradient is accumulated in fp32 (one ``[V, H]`` fp32 buffer) whatever its dtype.
    The backward pass only scales gradients computed in the forward pass, so it can run once.
    """
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int (positions per chunk), got {chunk_size!r}")
    loss = _Divergence(kind, beta, alpha, temperature, tail)
    vocab_size, hidden_size = lm_head_weight.shape
    if hidden.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden is {tuple(hidden.shape)} but lm_head_weight is {tuple(lm_head_weight.shape)}: "
            "their last sizes must match"
        )
    _check_shapes(vocab_size, hidden.shape[:-1], teacher, labels, "hidden")
    # Indexing by (batch, time) pairs copies only a chunk's rows, even of a sliced (non-contiguous) input.
    positions = labels.ne(ignore_index).nonzero()  # [N, 2] counted (batch, time) pairs
    teachers = (
        (None, teacher.ids, teacher.logprobs.detach()) if isinstance(teacher, TopK) else (teacher.detach(), None, None)
    )
    total = _ChunkedLoss.apply(hidden, lm_head_weight, positions, *teachers, loss, chunk_size, torch.is_grad_enabled())
    return temperature**2 * total / max(len(positions), 1)


def forward_kl(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopK,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
) -> torch.Tensor:
    """KL(p‖q) with p the teacher's and q the student's next-token distribution at τ = 1; scalar."""
    return distillation_loss(student_logits, teacher, labels, kind="forward_kl", ignore_index=ignore_index)


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy over counted positions; 0 when none count. Scalar."""
    per_position = F.cross_entropy(
        student_logits.float().flatten(0, 1), labels.flatten().clamp(min=0), reduction="none"
    ).view_as(labels)
    mask = labels.ne(ignore_index)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


# --- the divergences ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Divergence:
    """One loss's options, checked on creation; computes per-position divergences ``[N]``."""

    kind: str
    beta: float
    alpha: float
    temperature: float
    tail: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.tail not in TAILS:
            raise ValueError(f"tail must be 'bucket' (k+1 outcomes) or 'renormalize' (k outcomes); got {self.tail!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.kind == "jsd" and not 0 < self.beta < 1:
            raise ValueError(
                f"jsd needs 0 < beta < 1, got beta={self.beta!r}: at 0 or 1 the mixture m equals one of the two "
                "distributions and the jsd is identically 0. For the KL limits (TRL's beta=0 and beta=1) "
                "use kind='forward_kl' or kind='reverse_kl'."
            )
        if self.kind.startswith("skew_") and not 0 < self.alpha < 1:
            plain = self.kind.removeprefix("skew_")
            raise ValueError(
                f"{self.kind} needs 0 < alpha < 1, got alpha={self.alpha!r}: alpha=0 is plain {plain} "
                f"(use kind={plain!r}) and alpha=1 makes the loss identically 0."
            )

    def dense(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """From fp32 student logits ``[N, V]`` and teacher logits ``[N, V]``."""
        tau = self.temperature
        return self.of_logprobs((teacher_logits.float() / tau).log_softmax(-1), (student_logits / tau).log_softmax(-1))

    def top_k(
        self, student_top: torch.Tensor, student_bucket: torch.Tensor, teacher: TopK, vocab_size: int
    ) -> torch.Tensor:
        """From the student's τ = 1 log-probs of the teacher's ids ``[N, k]`` and its bucket log-mass ``[N]``
        (both from `_student_top_k_forward`), and the teacher's rows ``[N, k]``."""
        tau, teacher_top = self.temperature, teacher.logprobs.float()
        if self.tail == "renormalize" or teacher_top.shape[-1] == vocab_size:  # k = V: the bucket is empty
            # Clamped so that a student giving all k ids −inf compares as uniform instead of NaN.
            student_top = (student_top / tau).clamp(min=torch.finfo(torch.float32).min)
            return self.of_logprobs((teacher_top / tau).log_softmax(-1), student_top.log_softmax(-1))
        teacher_bucket = torch.log(
            (-torch.expm1(teacher_top.logsumexp(-1))).clamp(min=0)
        )  # [N], −inf if the top-k sums past 1
        return self.of_logprobs(
            _bucket_outcomes(teacher_top, teacher_bucket, tau), _bucket_outcomes(student_top, student_bucket, tau)
        )

    def of_logprobs(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """Between teacher ``log_p`` and student ``log_q``, log-probs over the same outcomes ``[N, outcomes]``."""
        log_p, log_q = log_p.clamp(min=_LOG_FLOOR), log_q.clamp(min=_LOG_FLOOR)
        if self.kind == "forward_kl":
            return _kl(log_p, log_q)
        if self.kind == "reverse_kl":
            return _kl(log_q, log_p)
        if self.kind == "jsd":
            beta = self.beta
            log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
            return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
        if self.kind == "skew_forward_kl":
            return _kl(log_p, torch.logaddexp(log_p + math.log(self.alpha), log_q + math.log1p(-self.alpha)))
        if self.kind == "skew_reverse_kl":
            return _kl(log_q, torch.logaddexp(log_q + math.log(self.alpha), log_p + math.log1p(-self.alpha)))
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)  # tvd


def _bucket_outcomes(top: torch.Tensor, bucket: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs ``[N, k+1]`` at τ from τ = 1 log-probs of the k ids ``[N, k]`` and the bucket ``[N]``:
    divided by τ and renormalized, then the bucket gets ``_TAIL_SMOOTHING`` more mass and all are renormalized."""
    outcomes = (torch.cat([top, bucket.unsqueeze(-1)], -1) / temperature).log_softmax(-1)
    smoothed_bucket = torch.logaddexp(outcomes[:, -1:], torch.full_like(outcomes[:, -1:], math.log(_TAIL_SMOOTHING)))
    return torch.cat([outcomes[:, :-1], smoothed_bucket], -1) - math.log1p(_TAIL_SMOOTHING)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) per row, from log-probs floored at ``_LOG_FLOOR`` (so every term is finite)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _check_shapes(
    vocab_size: int, positions: torch.Size, teacher: torch.Tensor | TopK, labels: torch.Tensor, student_name: str
) -> None:
    if labels.shape != positions:
        raise ValueError(
            f"labels is {tuple(labels.shape)} but {student_name} has positions {tuple(positions)}; "
            "they must match (the caller shifts)"
        )
    if isinstance(teacher, TopK):
        ids, logprobs = teacher
        if ids.shape != logprobs.shape or ids.shape[:-1] != positions:
            raise ValueError(
                f"TopK ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} "
                f"must both be {tuple(positions)} + (k,)"
            )
        if ids.shape[-1] > vocab_size:
            raise ValueError(
                f"the teacher's top-k has k={ids.shape[-1]} ids but the student's vocabulary has {vocab_size}"
            )
    elif teacher.shape != (*positions, vocab_size):
        raise ValueError(
            f"dense teacher logits are {tuple(teacher.shape)} but the student's are {(*positions, vocab_size)}; "
            "slice padded vocabulary rows off the larger one, or pass a TopK"
        )


# --- the student's top-k outcomes, with a one-buffer gradient -----------------------------------


def _student_top_k_forward(logits: torch.Tensor, ids: torch.Tensor, *, in_place: bool):
    """The student's τ = 1 log-probs at ``ids`` ``[N, k]`` and its bucket log-mass ``[N]`` (−inf if empty).

    ``logits`` ``[N, V]`` fp32 (overwritten when ``in_place``). Also returns what the backward needs:
    the softmax with zeros at ``ids`` ``[N, V]`` (the same buffer when ``in_place``), the softmax at
    ``ids`` ``[N, k]`` and the exact tail mass ``[N]`` (summed, not 1 − Σ top, so tiny tails stay exact).
    """
    row_max = logits.amax(-1, keepdim=True)  # [N, 1]
    top_logits = logits.gather(-1, ids)
    probs = logits.sub_(row_max) if in_place else logits - row_max
    sums = probs.exp_().sum(-1, keepdim=True)
    probs.div_(sums)
    top_probs = probs.gather(-1, ids)
    tail_mass = probs.scatter_(-1, ids, 0.0).sum(-1)
    top_logprobs = top_logits - row_max - sums.log()
    return top_logprobs, tail_mass.log(), (probs, top_probs, tail_mass)


def _student_top_k_backward(
    saved, ids: torch.Tensor, grad_top: torch.Tensor, grad_bucket: torch.Tensor, *, in_place: bool
) -> torch.Tensor:
    """Gradient w.r.t. the logits ``[N, V]`` (in the softmax's buffer when ``in_place``).

    With q the softmax, t the tail mass, a_i = log q_{ids_i} and b = log t:
    ∂a_i/∂z_j = [j = ids_i] − q_j and ∂b/∂z_j = q_j·[j ∉ ids] / t − q_j, so with
    G = Σ_i ∂L/∂a_i + ∂L/∂b: ∂L/∂z_j = q_j·(∂L/∂b / t − G) off the ids and ∂L/∂a_i − G·q_j at
    j = ids_i. When t = 0 every q_j off the ids is 0 (and so is ∂L/∂b): the 0/0 is taken as 0.
    """
    probs, top_probs, tail_mass = saved
    total = grad_top.sum(-1) + grad_bucket  # G [N]
    per_tail_mass = torch.where(tail_mass > 0, grad_bucket / tail_mass, 0.0)
    outside = (per_tail_mass - total).unsqueeze(-1)  # [N, 1]
    grad = probs.mul_(outside) if in_place else probs * outside  # zeros at ids
    return grad.scatter_add_(-1, ids, grad_top - total.unsqueeze(-1) * top_probs)


class _StudentTopK(torch.autograd.Function):
    """Autograd wrapper of `_student_top_k_forward` for the unfused path:
    ``(logits [N, V], ids [N, k]) -> ([N, k], [N])``."""

    @staticmethod
    def forward(ctx, logits, ids):
        top_logprobs, bucket, saved = _student_top_k_forward(logits, ids, in_place=False)
        ctx.saved, ctx.ids = saved, ids
        return top_logprobs, bucket

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_top, grad_bucket):
        return _student_top_k_backward(ctx.saved, ctx.ids, grad_top, grad_bucket, in_place=False), None


# --- the fused path -----------------------------------------------------------------------------


class _ChunkedLoss(torch.autograd.Function):
    """Sum over ``positions`` of the per-position loss of ``hidden[positions] @ weight.T``, chunk by chunk.

    Forward computes each chunk's logits, its loss and its gradient w.r.t. the chunk's logits
    (through `_student_top_k_backward` for a top-k teacher, autograd on the chunk for a dense one),
    which two matmuls turn into gradients w.r.t. the hidden rows and the weight. Only those
    gradients are kept; backward scales them.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, positions, teacher_logits, teacher_ids, teacher_logprobs, loss, chunk_size, grad_enabled
    ):
        # hidden [B, T, H]; weight [V, H]; positions [N, 2]; teacher_logits [B, T, V] or teacher_ids/logprobs [B, T, k].
        # needs_input_grad says True even under torch.no_grad(), hence grad_enabled from the caller.
        need_hidden_grad, need_weight_grad = (grad_enabled and needed for needed in ctx.needs_input_grad[:2])
        grad_hidden = torch.zeros_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(positions), chunk_size):
            chunk = tuple(positions[start : start + chunk_size].T)  # (batch indices [c], time indices [c])
            chunk_hidden = hidden[chunk]  # [c, H]
            if teacher_logits is not None:
                chunk_teacher = teacher_logits[chunk]  # [c, V]
            else:
                chunk_teacher = TopK(teacher_ids[chunk].long(), teacher_logprobs[chunk])  # [c, k] each
            logits = (chunk_hidden @ weight.T).float()  # [c, V]
            if not (need_hidden_grad or need_weight_grad):  # evaluation: the value alone
                total += _chunk_value(logits, chunk_teacher, loss)
                continue
            chunk_total, grad_logits = (_top_k_chunk if isinstance(chunk_teacher, TopK) else _dense_chunk)(
                logits, chunk_teacher, loss
            )
            total += chunk_total
            if need_hidden_grad:
                grad_hidden.index_put_(chunk, (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype))
            if need_weight_grad:
                grad_weight.addmm_(grad_logits.T, chunk_hidden.float())
            del logits, grad_logits  # before the next chunk's logits exist, not after
        ctx.grad_hidden, ctx.grad_weight, ctx.weight_dtype = grad_hidden, grad_weight, weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        ctx.grad_hidden = ctx.grad_weight = None  # scaled in place below: a second backward would be wrong
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_total.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def _chunk_value(logits: torch.Tensor, teacher: torch.Tensor | TopK, loss: _Divergence) -> torch.Tensor:
    """A chunk's summed loss, without gradients."""
    if not isinstance(teacher, TopK):
        return loss.dense(logits, teacher).sum()
    top_logprobs, bucket, _ = _student_top_k_forward(logits, teacher.ids, in_place=True)
    return loss.top_k(top_logprobs, bucket, teacher, logits.shape[-1]).sum()


def _top_k_chunk(logits: torch.Tensor, teacher: TopK, loss: _Divergence) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's summed loss and its gradient w.r.t. ``logits`` ``[c, V]``, computed in ``logits``' buffer."""
    top_logprobs, bucket, saved = _student_top_k_forward(logits, teacher.ids, in_place=True)
    with torch.enable_grad():
        top_logprobs.requires_grad_(), bucket.requires_grad_()
        chunk_total = loss.top_k(top_logprobs, bucket, teacher, logits.shape[-1]).sum()
        # renormalize leaves the bucket unused: its gradient is then zeros.
        grad_top, grad_bucket = torch.autograd.grad(
            chunk_total, (top_logprobs, bucket), allow_unused=True, materialize_grads=True
        )
    return chunk_total.detach(), _student_top_k_backward(saved, teacher.ids, grad_top, grad_bucket, in_place=True)


def _dense_chunk(
    logits: torch.Tensor, teacher_logits: torch.Tensor, loss: _Divergence
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's summed loss and its gradient w.r.t. ``logits`` ``[c, V]``, by autograd on the chunk."""
    with torch.enable_grad():
        logits.requires_grad_()
        chunk_total = loss.dense(logits, teacher_logits).sum()
        (grad_logits,) = torch.autograd.grad(chunk_total, logits)
    return chunk_total.detach(), grad_logits
