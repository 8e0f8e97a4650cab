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

How the gradient is computed. No loss here leaves a graph of full-vocabulary temporaries for autograd:

- dense teacher: a custom autograd Function walks the counted positions in blocks of rows (a few rows on
  a CPU, so that a block's buffers stay in cache; about 2^24 elements per buffer on a GPU) and, in the
  forward pass, writes the gradient w.r.t. the student logits in closed form into one ``[B, T, V]``
  buffer (the backward pass only scales it). With ℓ = log_softmax(z/τ), q = exp(ℓ) and g = ∂L/∂ℓ per
  kind (below), ∂L/∂z = (g − q·Σg)/τ; the ``-1e4`` floor passes no gradient to a floored ℓ, as autograd
  through the clamp would not. Per kind, with p the teacher's probabilities, m = β·p + (1−β)·q and
  s the skew mixture: forward KL g = −p; reverse KL g = q·(ℓ − log p + 1); JSD g = (1−β)·q·(ℓ − log m);
  skew forward KL g = −(1−α)·p·q/s; skew reverse KL g = q·(ℓ − log s + 1 − α·q/s); TVD
  g = −½·sign(p − q)·q. A block needs five fp32 buffers of its size and nothing else of size V.
- top-k teacher: the student enters the loss only through its k+1 (or k) outcome log-probs, whose
  gradient w.r.t. the logits is written out by hand (`_student_top_k_backward`); autograd only sees
  the ``[N, k]`` tensors.

`distillation_loss_from_hidden` is the same loss computed from the last hidden state and the
LM-head weight, chunk by chunk over the counted positions, so the ``[B·T, V]`` student logits never
exist at once. Each chunk's gradients (w.r.t. the hidden state and the weight) are computed inside
the forward pass and kept, so the backward pass only scales them: no chunk is recomputed. A chunk
needs one ``[chunk, V]`` fp32 buffer (reused by every chunk): the logits become the gradient w.r.t.
the logits in place, block of rows by block of rows, with a dense teacher through the five small
block buffers above and with a top-k teacher through the softmax itself.
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
    if not isinstance(teacher, TopK):
        # Rows are read in place, block by block: neither side is copied, whatever its strides.
        positions = counted.nonzero().tolist()  # [N] counted (batch, time) index lists
        return _DenseLoss.apply(student_logits, teacher.detach(), positions, loss, torch.is_grad_enabled())
    student_rows = student_logits[counted].float()  # [N, V]
    teacher_rows = TopK(teacher.ids[counted].long(), teacher.logprobs[counted].detach())  # [N, k] each
    per_position = loss.top_k(*_StudentTopK.apply(student_rows, teacher_rows.ids), teacher_rows, student_rows.shape[-1])
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
            ``[chunk_size, V]`` buffer, reused by every chunk).
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
    return _ChunkedLoss.apply(hidden, lm_head_weight, positions, *teachers, loss, chunk_size, torch.is_grad_enabled())


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


def top_k_logprobs(logits: torch.Tensor, k: int) -> TopK:
    """A dense teacher's top-k: ids and log-probs ``[B, T, k]`` (fp32, of its full distribution at τ = 1) from
    logits ``[B, T, V]`` of any dtype and strides. Blocks of rows (views) go through fp32 one at a time, so the
    logits are never copied whole (a bf16 teacher's output is never held in fp32)."""
    batch, length, vocab_size = logits.shape
    values = torch.empty((batch, length, k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((batch, length, k), dtype=torch.long, device=logits.device)
    block_rows = _rows_per_block(vocab_size, logits.device)
    for row in range(batch):
        for start in range(0, length, block_rows):
            block = slice(start, start + block_rows)
            top = logits[row, block].float().log_softmax(-1).topk(k, dim=-1)
            values[row, block], ids[row, block] = top.values, top.indices
    return TopK(ids, values)


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


# --- blocks of rows -----------------------------------------------------------------------------

# Elements per fp32 block buffer. On a CPU a dense block's five buffers (2.5 MB) then stay in the core's cache, so
# each elementwise pass costs a fraction of a pass through memory; on a GPU, blocks are big enough that kernel
# launches don't count.
_CPU_BLOCK_ELEMENTS = 1 << 17
_GPU_BLOCK_ELEMENTS = 1 << 24
# The smallest normal fp32: floors the skew mixtures before dividing by them and taking their log.
_TINY = torch.finfo(torch.float32).tiny


def _rows_per_block(vocab_size: int, device: torch.device) -> int:
    budget = _CPU_BLOCK_ELEMENTS if device.type == "cpu" else _GPU_BLOCK_ELEMENTS
    return max(1, budget // max(vocab_size, 1))


def _runs(positions: list[list[int]], max_rows: int) -> list[tuple[tuple[int, ...], int, int]]:
    """``(prefix, start, length)`` for each run of at most ``max_rows`` consecutive positions, in order.

    ``positions`` are index lists ``[..., t]`` (from ``nonzero().tolist()``); a run shares the leading
    indices ``prefix`` and has consecutive last indices, so ``tensor[(*prefix, slice(start, start + length))]``
    is a view of its rows, never a copy.
    """
    runs: list[tuple[tuple[int, ...], int, int]] = []
    for *prefix, index in positions:
        prefix = tuple(prefix)
        if runs:
            last_prefix, start, length = runs[-1]
            if last_prefix == prefix and index == start + length and length < max_rows:
                runs[-1] = (prefix, start, length + 1)
                continue
        runs.append((prefix, index, 1))
    return runs


def _block_buffers(rows: int, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The five fp32 ``[rows, V]`` scratch buffers `_dense_block` works in."""
    return tuple(torch.empty(rows, vocab_size, dtype=torch.float32, device=device) for _ in range(5))


def _scaled(grad: torch.Tensor | None, grad_total: torch.Tensor) -> torch.Tensor | None:
    """``grad`` × the upstream gradient, in place; skipped when that is exactly 1 (``loss.backward()`` on a CPU)."""
    if grad is None or (grad_total.device.type == "cpu" and grad_total.item() == 1.0):
        return grad
    return grad.mul_(grad_total)


# --- the dense teacher, with a closed-form gradient ---------------------------------------------


def _log_softmax_into(out: torch.Tensor, logits: torch.Tensor, temperature: float, scratch: torch.Tensor) -> None:
    """``out`` = log_softmax(logits / τ) in fp32, over the last dimension; ``scratch`` is overwritten."""
    if logits.dtype != torch.float32:
        logits = scratch.copy_(logits)
        if temperature != 1:
            logits.div_(temperature)
    elif temperature != 1:
        logits = torch.div(logits, temperature, out=scratch)
    torch.log_softmax(logits, -1, out=out)


def _has_below_floor(logprobs: torch.Tensor) -> bool:
    """Whether any log-prob is under the floor; assumed on a GPU, where asking would wait for the device."""
    return logprobs.device.type != "cpu" or bool(logprobs.amin() < _LOG_FLOOR)


def _dense_block(
    loss: _Divergence,
    student: torch.Tensor,
    teacher: torch.Tensor,
    buffers: tuple[torch.Tensor, ...],
    grad_scale: float = 0.0,
    grad_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The divergence summed over a block of rows (an fp32 scalar), from student and teacher logits ``[r, V]``
    (any float dtype, any row stride).

    With ``grad_out`` ``[r, V]`` (which may be ``student`` itself: it is read first), also writes
    ``grad_scale`` × the sum's gradient w.r.t. ``student`` into it, in closed form (module docstring):
    ∂L/∂z = (g − q·Σg)/τ. ``buffers``: five fp32 ``[≥ r, V]`` scratch buffers.
    """
    rows, kind, tau = len(student), loss.kind, loss.temperature
    log_q, log_p, q, p, scratch = (buffer[:rows] for buffer in buffers)
    _log_softmax_into(log_q, student, tau, scratch)
    _log_softmax_into(log_p, teacher, tau, scratch)
    # exp(−inf) and exp(_LOG_FLOOR) are both 0 in fp32: q and p are the same before the floor as after it.
    torch.exp(log_q, out=q)
    torch.exp(log_p, out=p)
    want_grad = grad_out is not None
    step = grad_scale / tau  # the caller's scale × ∂(z/τ)/∂z
    grad = None  # step × g = step × ∂L/∂ℓ
    if kind == "tvd":
        if want_grad:
            grad = torch.sign(torch.sub(p, q, out=scratch), out=log_p).mul_(q).mul_(-0.5 * step)
        total = 0.5 * torch.sub(p, q, out=scratch).abs_().sum()
    else:
        # A floored ℓ gets no gradient (autograd through the clamp gives none); only forward KL's g = −p can be
        # non-zero there, where q = 0.
        unfloored = log_q.ge(_LOG_FLOOR) if want_grad and kind == "forward_kl" and _has_below_floor(log_q) else None
        log_q.clamp_(min=_LOG_FLOOR)
        log_p.clamp_(min=_LOG_FLOOR)
        if kind == "forward_kl":
            total = torch.sub(log_p, log_q, out=scratch).mul_(p).sum()
            if want_grad:
                grad = p.mul_(-step)
                if unfloored is not None:
                    grad.mul_(unfloored)
        elif kind == "reverse_kl":
            weighted = torch.sub(log_q, log_p, out=scratch).mul_(q)  # q·(ℓ − log p)
            total = weighted.sum()
            if want_grad:
                grad = weighted.add_(q).mul_(step)
        elif kind == "jsd":
            beta = loss.beta
            # log m, floored: where p = q = 0 both of its terms below are 0·finite.
            log_m = torch.lerp(q, p, beta, out=scratch).log_().clamp_(min=_LOG_FLOOR)
            weighted = log_q.sub_(log_m).mul_(q)  # q·(ℓ − log m)
            student_part = weighted.sum()
            total = beta * log_p.sub_(log_m).mul_(p).sum() + (1 - beta) * student_part
            if want_grad:
                grad = weighted.mul_((1 - beta) * step)
        elif kind == "skew_forward_kl":
            alpha = loss.alpha
            mixture = torch.lerp(q, p, alpha, out=scratch).clamp_(min=_TINY)  # s = α·p + (1−α)·q
            if want_grad:
                grad = torch.mul(p, q, out=log_q).div_(mixture).mul_(-(1 - alpha) * step)
            total = log_p.sub_(mixture.log_()).mul_(p).sum()
        else:  # skew_reverse_kl
            alpha = loss.alpha
            mixture = torch.lerp(p, q, alpha, out=scratch).clamp_(min=_TINY)  # s = α·q + (1−α)·p
            self_share = torch.mul(q, q, out=log_p).div_(mixture).mul_(-alpha) if want_grad else None  # −α·q²/s
            weighted = log_q.sub_(mixture.log_()).mul_(q)  # q·(ℓ − log s)
            total = weighted.sum()
            if want_grad:
                grad = weighted.add_(q).add_(self_share).mul_(step)
    if want_grad:
        torch.addcmul(grad, q, grad.sum(-1, keepdim=True), value=-1, out=grad_out)
    return total


class _DenseLoss(torch.autograd.Function):
    """τ² × the mean over ``positions`` of the divergence between dense student and teacher logits ``[..., V]``.

    Forward walks the positions in runs of consecutive rows (views of both inputs, no copies) and, when a
    gradient is wanted, writes the gradient w.r.t. the student logits into one buffer shaped like them;
    backward only scales it.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, positions, loss, grad_enabled):
        # positions: [N] index lists into the leading dims; needs_input_grad says True even under torch.no_grad().
        vocab_size, device = student_logits.shape[-1], student_logits.device
        scale = loss.temperature**2 / max(len(positions), 1)
        grad = None
        if grad_enabled and ctx.needs_input_grad[0]:
            every_row = len(positions) == student_logits.numel() // max(vocab_size, 1)
            grad = (torch.empty_like if every_row else torch.zeros_like)(student_logits)
        block_rows = _rows_per_block(vocab_size, device)
        buffers = _block_buffers(min(block_rows, len(positions)), vocab_size, device)
        total = torch.zeros((), dtype=torch.float32, device=device)
        for prefix, start, length in _runs(positions, block_rows):
            rows = (*prefix, slice(start, start + length))
            total += _dense_block(
                loss, student_logits[rows], teacher_logits[rows], buffers, scale, None if grad is None else grad[rows]
            )
        ctx.grad = grad
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grad, ctx.grad = ctx.grad, None  # scaled in place: a second backward would be wrong
        return _scaled(grad, grad_total), None, None, None, None


# --- the student's top-k outcomes, with a one-buffer gradient -----------------------------------


def _student_top_k_forward(logits: torch.Tensor, ids: torch.Tensor, *, out: torch.Tensor, block_rows: int):
    """The student's τ = 1 log-probs at ``ids`` ``[N, k]`` and its bucket log-mass ``[N]`` (−inf if empty).

    ``logits`` ``[N, V]`` fp32, read block of rows by block of rows. ``out`` ``[N, V]`` fp32 (which may be
    ``logits``) receives exp(z − max z) with zeros at ``ids``. Also returns what the backward needs: ``out``,
    the row sums of exp(z − max z) ``[N, 1]``, the softmax at ``ids`` ``[N, k]`` and the exact tail mass ``[N]``
    (summed, not 1 − Σ top, so tiny tails stay exact).
    """
    row_max = logits.new_empty(len(logits), 1)
    sums, tail_sums = torch.empty_like(row_max), logits.new_empty(len(logits))
    top_logits, top_exps = logits.new_empty(ids.shape), logits.new_empty(ids.shape)
    for start in range(0, len(logits), block_rows):
        rows = slice(start, start + block_rows)
        block, block_ids, exps = logits[rows], ids[rows], out[rows]
        torch.gather(block, -1, block_ids, out=top_logits[rows])  # before exps overwrites an in-place block
        torch.amax(block, -1, keepdim=True, out=row_max[rows])
        torch.sub(block, row_max[rows], out=exps).exp_()
        torch.sum(exps, -1, keepdim=True, out=sums[rows])
        torch.gather(exps, -1, block_ids, out=top_exps[rows])
        torch.sum(exps.scatter_(-1, block_ids, 0.0), -1, out=tail_sums[rows])
    tail_mass = tail_sums / sums.squeeze(-1)
    top_logprobs = top_logits - row_max - sums.log()
    return top_logprobs, tail_mass.log(), (out, sums, top_exps / sums, tail_mass)


def _student_top_k_backward(
    saved, ids: torch.Tensor, grad_top: torch.Tensor, grad_bucket: torch.Tensor, *, out: torch.Tensor, block_rows: int
) -> torch.Tensor:
    """Gradient w.r.t. the logits ``[N, V]``, written into ``out`` (which may be the saved exp buffer).

    With q the softmax, t the tail mass, a_i = log q_{ids_i} and b = log t:
    ∂a_i/∂z_j = [j = ids_i] − q_j and ∂b/∂z_j = q_j·[j ∉ ids] / t − q_j, so with
    G = Σ_i ∂L/∂a_i + ∂L/∂b: ∂L/∂z_j = q_j·(∂L/∂b / t − G) off the ids and ∂L/∂a_i − G·q_j at
    j = ids_i. When t = 0 every q_j off the ids is 0 (and so is ∂L/∂b): the 0/0 is taken as 0.
    """
    exps, sums, top_probs, tail_mass = saved
    total = grad_top.sum(-1) + grad_bucket  # G [N]
    per_tail_mass = torch.where(tail_mass > 0, grad_bucket / tail_mass, 0.0)
    outside = (per_tail_mass - total).unsqueeze(-1) / sums  # [N, 1]; exps / sums = q, zeros at ids
    at_ids = grad_top - total.unsqueeze(-1) * top_probs  # [N, k]
    for start in range(0, len(exps), block_rows):
        rows = slice(start, start + block_rows)
        torch.mul(exps[rows], outside[rows], out=out[rows]).scatter_add_(-1, ids[rows], at_ids[rows])
    return out


class _StudentTopK(torch.autograd.Function):
    """Autograd wrapper of `_student_top_k_forward` for the unfused path:
    ``(logits [N, V] fp32, ids [N, k]) -> ([N, k], [N])``."""

    @staticmethod
    def forward(ctx, logits, ids):
        ctx.block_rows = _rows_per_block(logits.shape[-1], logits.device)
        top_logprobs, bucket, saved = _student_top_k_forward(
            logits, ids, out=torch.empty_like(logits), block_rows=ctx.block_rows
        )
        ctx.saved, ctx.ids = saved, ids
        return top_logprobs, bucket

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_top, grad_bucket):
        out = torch.empty_like(ctx.saved[0])  # the saved buffer stays intact
        return _student_top_k_backward(
            ctx.saved, ctx.ids, grad_top, grad_bucket, out=out, block_rows=ctx.block_rows
        ), None


# --- the fused path -----------------------------------------------------------------------------


class _ChunkedLoss(torch.autograd.Function):
    """τ² × the mean over ``positions`` of the per-position loss of ``hidden[positions] @ weight.T``, chunk by chunk.

    Forward computes each chunk's logits into one reused ``[chunk, V]`` fp32 buffer, its loss and, in the same
    buffer, the scaled gradient w.r.t. the chunk's logits (`_dense_chunk` or `_top_k_chunk`), which two
    matmuls turn into gradients w.r.t. the hidden rows and the weight. Only those gradients are kept;
    backward scales them.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, positions, teacher_logits, teacher_ids, teacher_logprobs, loss, chunk_size, grad_enabled
    ):
        # hidden [B, T, H]; weight [V, H]; positions [N, 2]; teacher_logits [B, T, V] or teacher_ids/logprobs [B, T, k].
        # needs_input_grad says True even under torch.no_grad(), hence grad_enabled from the caller.
        need_hidden_grad, need_weight_grad = (grad_enabled and needed for needed in ctx.needs_input_grad[:2])
        grad_scale = loss.temperature**2 / max(len(positions), 1) if need_hidden_grad or need_weight_grad else None
        vocab_size, device = weight.shape[0], hidden.device
        grad_hidden = torch.zeros_like(hidden) if need_hidden_grad else None
        grad_weight = None  # fp32 [V, H]: the first chunk's matmul creates it
        block_rows = _rows_per_block(vocab_size, device)
        chunk_rows = min(chunk_size, len(positions))
        logits_buffer = torch.empty(chunk_rows, vocab_size, dtype=torch.float32, device=device)
        if teacher_logits is not None:
            block_buffers = _block_buffers(min(block_rows, chunk_rows), vocab_size, device)
            position_lists = positions.tolist()
        total = torch.zeros((), dtype=torch.float32, device=device)
        for start in range(0, len(positions), chunk_size):
            chunk = tuple(positions[start : start + chunk_size].T)  # (batch indices [c], time indices [c])
            chunk_hidden = hidden[chunk]  # [c, H]
            logits = logits_buffer[: len(chunk_hidden)]  # [c, V]
            if hidden.dtype == weight.dtype == torch.float32:
                torch.mm(chunk_hidden, weight.T, out=logits)
            else:
                logits.copy_(chunk_hidden @ weight.T)
            if teacher_logits is not None:
                chunk_positions = position_lists[start : start + chunk_size]
                total += _dense_chunk(
                    logits, teacher_logits, chunk_positions, loss, block_rows, block_buffers, grad_scale
                )
            else:
                chunk_teacher = TopK(teacher_ids[chunk].long(), teacher_logprobs[chunk])  # [c, k] each
                total += _top_k_chunk(logits, chunk_teacher, loss, block_rows, grad_scale)
            if grad_scale is None:  # evaluation: the value alone
                continue
            # logits now holds grad_scale × the gradient w.r.t. the chunk's logits.
            if need_hidden_grad:
                grad_hidden.index_put_(chunk, (logits.to(weight.dtype) @ weight).to(hidden.dtype))
            if need_weight_grad:
                if grad_weight is None:
                    grad_weight = torch.mm(logits.T, chunk_hidden.float())
                else:
                    grad_weight.addmm_(logits.T, chunk_hidden.float())
        if need_weight_grad and grad_weight is None:  # nothing counted
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device)
        ctx.grad_hidden, ctx.grad_weight, ctx.weight_dtype = grad_hidden, grad_weight, weight.dtype
        return total * (loss.temperature**2 / max(len(positions), 1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        ctx.grad_hidden = ctx.grad_weight = None  # scaled in place below: a second backward would be wrong
        grad_hidden, grad_weight = _scaled(grad_hidden, grad_total), _scaled(grad_weight, grad_total)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def _dense_chunk(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    positions: list[list[int]],
    loss: _Divergence,
    block_rows: int,
    buffers: tuple[torch.Tensor, ...],
    grad_scale: float | None,
) -> torch.Tensor:
    """A chunk's summed loss; with ``grad_scale``, ``logits`` ``[c, V]`` becomes grad_scale × its gradient.

    ``positions`` are the chunk's ``c`` (batch, time) index lists into ``teacher_logits`` ``[B, T, V]``, whose
    rows are read as views, run by run.
    """
    total, row = torch.zeros((), dtype=torch.float32, device=logits.device), 0
    for prefix, start, length in _runs(positions, block_rows):
        student = logits[row : row + length]
        teacher = teacher_logits[(*prefix, slice(start, start + length))]
        if grad_scale is None:
            total += _dense_block(loss, student, teacher, buffers)
        else:
            total += _dense_block(loss, student, teacher, buffers, grad_scale, grad_out=student)
        row += length
    return total


def _top_k_chunk(
    logits: torch.Tensor, teacher: TopK, loss: _Divergence, block_rows: int, grad_scale: float | None
) -> torch.Tensor:
    """A chunk's summed loss; with ``grad_scale``, ``logits`` ``[c, V]`` becomes grad_scale × its gradient."""
    top_logprobs, bucket, saved = _student_top_k_forward(logits, teacher.ids, out=logits, block_rows=block_rows)
    if grad_scale is None:
        return loss.top_k(top_logprobs, bucket, teacher, logits.shape[-1]).sum()
    with torch.enable_grad():
        top_logprobs.requires_grad_(), bucket.requires_grad_()
        chunk_total = loss.top_k(top_logprobs, bucket, teacher, logits.shape[-1]).sum()
        # renormalize leaves the bucket unused: its gradient is then zeros.
        grad_top, grad_bucket = torch.autograd.grad(
            chunk_total, (top_logprobs, bucket), allow_unused=True, materialize_grads=True
        )
    _student_top_k_backward(
        saved, teacher.ids, grad_top * grad_scale, grad_bucket * grad_scale, out=logits, block_rows=block_rows
    )
    return chunk_total.detach()
