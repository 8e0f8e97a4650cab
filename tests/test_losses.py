"""Loss properties: zero for identical distributions, top-k with k = V equals dense, masking, gradients."""

import torch
import torch.nn.functional as F

from stillhouse.training.losses import TopK, cross_entropy, forward_kl, top_k_logprobs

B, T, V = 2, 5, 11


def random_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=generator)
    teacher = torch.randn(B, T, V, generator=generator) * 2
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[0, :2] = -100
    return student, teacher, labels


def top_k_of(teacher_logits, k):
    logprobs = teacher_logits.log_softmax(-1)
    values, ids = logprobs.topk(k, dim=-1)
    return TopK(ids, values)


def test_dense_forward_kl_matches_definition():
    student, teacher, labels = random_inputs()
    p, log_q = teacher.softmax(-1), student.log_softmax(-1)
    expected = (p * (p.log() - log_q)).sum(-1)[labels != -100].mean()
    torch.testing.assert_close(forward_kl(student, teacher, labels), expected)


def test_forward_kl_is_zero_for_identical_distributions():
    _, teacher, labels = random_inputs()
    assert forward_kl(teacher, teacher, labels).abs() < 1e-6
    assert forward_kl(teacher, top_k_of(teacher, 4), labels).abs() < 1e-5


def test_forward_kl_wrapper_with_full_vocabulary_top_k_equals_dense():
    student, teacher, labels = random_inputs(1)
    torch.testing.assert_close(
        forward_kl(student, top_k_of(teacher, V), labels), forward_kl(student, teacher, labels), atol=1e-4, rtol=1e-4
    )


def test_top_k_bucket_is_non_negative_and_below_dense():
    student, teacher, labels = random_inputs(2)
    for k in (1, 3, 6):
        value = forward_kl(student, top_k_of(teacher, k), labels)
        # Merging outcomes into a bucket can only lose information (data-processing inequality).
        assert 0 <= value <= forward_kl(student, teacher, labels) + 1e-5


def test_all_masked_gives_zero_not_nan_and_ignored_positions_do_not_matter():
    student, teacher, labels = random_inputs()
    masked = torch.full_like(labels, -100)
    assert forward_kl(student, top_k_of(teacher, 3), masked) == 0
    assert cross_entropy(student, masked) == 0
    changed = student.clone()
    changed[0, :2] += 100  # positions whose label is -100
    torch.testing.assert_close(forward_kl(changed, teacher, labels), forward_kl(student, teacher, labels))


def test_cross_entropy_matches_torch_and_gradients_are_finite():
    student, teacher, labels = random_inputs()
    expected = F.cross_entropy(student.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(cross_entropy(student, labels), expected)
    student = student.to(torch.bfloat16).requires_grad_()
    loss = forward_kl(student, top_k_of(teacher, 3), labels) + cross_entropy(student, labels)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(student.grad.float()).all()


# --- distillation_loss: every kind, both teacher types, the fused path ----------------------------

import math  # noqa: E402

import pytest  # noqa: E402

from stillhouse.training import losses  # noqa: E402
from stillhouse.training.losses import KINDS, distillation_loss, distillation_loss_from_hidden  # noqa: E402

H, K = 8, 4
TEACHERS = ("dense", "bucket", "renormalize")  # a dense teacher, or its top-K with each tail mode


def teacher_and_tail(teacher_logits, teacher_type, k=K):
    if teacher_type == "dense":
        return teacher_logits, "bucket"
    return top_k_of(teacher_logits, k), teacher_type


def reference(kind, log_p, log_q, beta=0.5, alpha=0.1):
    """Each kind's formula written out directly, per position, in float64."""
    p, q = log_p.double().exp(), log_q.double().exp()
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    return {
        "forward_kl": lambda: kl(p, q),
        "reverse_kl": lambda: kl(q, p),
        "skew_forward_kl": lambda: kl(p, alpha * p + (1 - alpha) * q),
        "skew_reverse_kl": lambda: kl(q, alpha * q + (1 - alpha) * p),
        "tvd": lambda: 0.5 * (p - q).abs().sum(-1),
    }[kind]()


def masked_mean(per_position, labels):
    return per_position[labels != -100].mean().float()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("teacher_type", TEACHERS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_every_kind_is_zero_for_identical_distributions(kind, teacher_type, temperature):
    _, logits, labels = random_inputs(3)
    teacher, tail = teacher_and_tail(logits, teacher_type)
    loss = distillation_loss(logits, teacher, labels, kind=kind, tail=tail, temperature=temperature)
    assert loss.abs() < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl_equal_kl_div(temperature):
    student, teacher, labels = random_inputs(4)
    log_q, log_p = (student / temperature).log_softmax(-1), (teacher / temperature).log_softmax(-1)
    forward = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # KL(p‖q)
    reverse = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)  # KL(q‖p)
    for kind, expected in (("forward_kl", forward), ("reverse_kl", reverse)):
        loss = distillation_loss(student, teacher, labels, kind=kind, temperature=temperature)
        torch.testing.assert_close(loss, temperature**2 * masked_mean(expected, labels))


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_matches_its_formula(kind):
    student, teacher, labels = random_inputs(5)
    expected = masked_mean(
        reference(kind, teacher.log_softmax(-1), student.log_softmax(-1), beta=0.3, alpha=0.2), labels
    )
    torch.testing.assert_close(distillation_loss(student, teacher, labels, kind=kind, beta=0.3, alpha=0.2), expected)


def test_jsd_is_symmetric_at_half_and_mirrors_beta():
    a, b, labels = random_inputs(6)
    jsd = lambda s, t, beta: distillation_loss(s, t, labels, kind="jsd", beta=beta)  # noqa: E731
    torch.testing.assert_close(jsd(a, b, 0.5), jsd(b, a, 0.5))
    torch.testing.assert_close(jsd(a, b, 0.2), jsd(b, a, 0.8))
    assert jsd(a, b, 0.5) <= math.log(2)  # the JSD's bound


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_with_full_vocabulary_equals_dense(kind, tail, temperature):
    student, teacher, labels = random_inputs(7)
    options = dict(kind=kind, temperature=temperature)
    dense = distillation_loss(student, teacher, labels, **options)
    top_k = distillation_loss(student, top_k_of(teacher, V), labels, tail=tail, **options)
    torch.testing.assert_close(top_k, dense, atol=1e-5, rtol=0)


def with_bucket(top_logprobs):
    """``[..., k]`` log-probs from a full distribution → ``[..., k+1]`` with the rest's log-mass last."""
    return torch.cat([top_logprobs, torch.log(-torch.expm1(top_logprobs.logsumexp(-1, keepdim=True)))], -1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_top_k_gradients_equal_autograd_through_the_dense_path(kind, tail, temperature, monkeypatch):
    """The student's top-k outcomes have a hand-written backward; check it against plain autograd:
    the dense loss over the k+1 (bucket) or k (renormalize) outcomes built with torch ops, and at k = V the dense loss.
    The plain version has no 1e-8 bucket smoothing (visible at τ = 0.5, where tails shrink), so it is all but off
    here."""
    monkeypatch.setattr(losses, "_TAIL_SMOOTHING", 1e-30)
    student, teacher, labels = random_inputs(18)
    student.requires_grad_()
    top = top_k_of(teacher, K)
    grad_of = lambda loss: torch.autograd.grad(loss, student)[0]  # noqa: E731
    options = dict(kind=kind, temperature=temperature)
    grad = grad_of(distillation_loss(student, top, labels, tail=tail, **options))
    if tail == "bucket":
        plain = distillation_loss(
            with_bucket(student.log_softmax(-1).gather(-1, top.ids)), with_bucket(top.logprobs), labels, **options
        )
    else:
        plain = distillation_loss(student.gather(-1, top.ids), teacher.gather(-1, top.ids), labels, **options)
    torch.testing.assert_close(grad, grad_of(plain), atol=1e-6, rtol=0)
    full_vocabulary = grad_of(distillation_loss(student, top_k_of(teacher, V), labels, tail=tail, **options))
    torch.testing.assert_close(
        full_vocabulary, grad_of(distillation_loss(student, teacher, labels, **options)), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_on_a_top_k_teacher_is_as_documented(kind):
    """bucket: the τ=1 log-probs of the k ids and the bucket, divided by τ and renormalized over k+1, on both sides;
    renormalize: the τ distributions restricted to the k ids, exactly."""
    student, teacher, labels = random_inputs(8)
    top = top_k_of(teacher, K)
    student_logprobs = student.log_softmax(-1)
    student_top = student_logprobs.gather(-1, top.ids)
    options = dict(kind=kind, temperature=2.0)
    torch.testing.assert_close(
        distillation_loss(student, top, labels, tail="bucket", **options),
        distillation_loss(
            with_bucket(student_top), with_bucket(top.logprobs), labels, **options
        ),  # dense over k+1 outcomes
        atol=1e-5,
        rtol=0,
    )
    torch.testing.assert_close(
        distillation_loss(student, top, labels, tail="renormalize", **options),
        distillation_loss(
            student.gather(-1, top.ids), teacher.gather(-1, top.ids), labels, **options
        ),  # dense over k outcomes
        atol=1e-6,
        rtol=1e-6,
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("teacher_type", ["dense", "renormalize"])
def test_temperature_scales_by_tau_squared(kind, teacher_type):
    student, teacher, labels = random_inputs(9)
    tau = 3.0
    hot_teacher, tail = teacher_and_tail(teacher, teacher_type)
    if teacher_type == "dense":
        cold_teacher = teacher / tau
    else:
        cold_teacher = TopK(hot_teacher.ids, hot_teacher.logprobs / tau)
    hot = distillation_loss(student, hot_teacher, labels, kind=kind, tail=tail, temperature=tau)
    cold = distillation_loss(student / tau, cold_teacher, labels, kind=kind, tail=tail)
    torch.testing.assert_close(hot, tau**2 * cold)


def hidden_inputs(seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=generator).to(dtype).requires_grad_()
    teacher = torch.randn(B, T, V, generator=generator) * 2
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[0, :2] = -100  # 8 counted positions of B·T = 10
    return hidden, weight, teacher, labels


def loss_and_gradients(loss, *inputs):
    return (loss.detach(), *torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("teacher_type", TEACHERS)
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 64])  # 8 counted positions: divides, doesn't, divides, one chunk
def test_fused_equals_unfused_in_values_and_gradients(kind, teacher_type, chunk_size):
    hidden, weight, teacher_logits, labels = hidden_inputs(10)
    teacher, tail = teacher_and_tail(teacher_logits, teacher_type)
    options = dict(kind=kind, tail=tail, temperature=2.0, beta=0.3, alpha=0.2)
    unfused = loss_and_gradients(distillation_loss(hidden @ weight.T, teacher, labels, **options), hidden, weight)
    fused = loss_and_gradients(
        distillation_loss_from_hidden(hidden, weight, teacher, labels, chunk_size=chunk_size, **options), hidden, weight
    )
    for expected, actual in zip(unfused, fused):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert fused[1][0, :2].eq(0).all()  # masked positions get no gradient


def test_fused_without_gradients_and_with_a_frozen_head():
    hidden, weight, teacher_logits, labels = hidden_inputs(11)
    teacher = top_k_of(teacher_logits, K)
    with torch.no_grad():
        for target in (teacher, teacher_logits):
            expected = distillation_loss(hidden @ weight.T, target, labels, kind="jsd")
            torch.testing.assert_close(
                distillation_loss_from_hidden(hidden, weight, target, labels, kind="jsd", chunk_size=3), expected
            )
    frozen = weight.detach()
    fused = distillation_loss_from_hidden(hidden, frozen, teacher, labels, kind="jsd", chunk_size=3)
    (expected_grad,) = torch.autograd.grad(distillation_loss(hidden @ frozen.T, teacher, labels, kind="jsd"), hidden)
    torch.testing.assert_close(torch.autograd.grad(fused, hidden)[0], expected_grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("teacher_type", TEACHERS)
def test_all_masked_gives_zero_and_zero_gradients(kind, teacher_type):
    hidden, weight, teacher_logits, labels = hidden_inputs(12)
    teacher, tail = teacher_and_tail(teacher_logits, teacher_type)
    masked = torch.full_like(labels, -100)
    for loss in (
        distillation_loss(hidden @ weight.T, teacher, masked, kind=kind, tail=tail),
        distillation_loss_from_hidden(hidden, weight, teacher, masked, kind=kind, tail=tail, chunk_size=4),
    ):
        value, grad_hidden, grad_weight = loss_and_gradients(loss, hidden, weight)
        assert value == 0 and grad_hidden.eq(0).all() and grad_weight.eq(0).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("teacher_type", TEACHERS)
def test_bf16_inputs_are_computed_in_fp32(kind, teacher_type):
    student, teacher_logits, labels = random_inputs(13)
    teacher, tail = teacher_and_tail(teacher_logits.to(torch.bfloat16), teacher_type)
    student = student.to(torch.bfloat16).requires_grad_()
    loss = distillation_loss(student, teacher, labels, kind=kind, tail=tail)
    upcast_teacher = teacher.float() if teacher_type == "dense" else TopK(teacher.ids, teacher.logprobs.float())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, distillation_loss(student.float(), upcast_teacher, labels, kind=kind, tail=tail))
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()

    hidden, weight, _, _ = hidden_inputs(13, dtype=torch.bfloat16)
    unfused = loss_and_gradients(
        distillation_loss(hidden @ weight.T, teacher, labels, kind=kind, tail=tail), hidden, weight
    )
    fused = loss_and_gradients(
        distillation_loss_from_hidden(hidden, weight, teacher, labels, kind=kind, tail=tail, chunk_size=3),
        hidden,
        weight,
    )
    assert fused[0].dtype == torch.float32 and [g.dtype for g in fused[1:]] == [torch.bfloat16] * 2
    for expected, actual in zip(unfused, fused):
        torch.testing.assert_close(actual.float(), expected.float(), atol=2e-2, rtol=2e-2)


def assert_finite_with_finite_gradients(student, teacher, labels, tail="bucket"):
    for kind in KINDS:
        student_leaf = student.detach().requires_grad_()
        loss = distillation_loss(student_leaf, teacher, labels, kind=kind, tail=tail, temperature=2.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student_leaf.grad).all(), kind


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_very_confident_teachers_are_safe(tail):
    student, teacher, labels = random_inputs(14)
    assert_finite_with_finite_gradients(student, teacher * 1e3, labels)  # log-probs down to about -5000
    one_hot = top_k_of(teacher * 1e3, K)  # top-1 log-prob 0.0: the top-k holds all the mass
    assert_finite_with_finite_gradients(student, one_hot, labels, tail)
    # fp16-rounded log-probs can sum past 1: the bucket is then empty, not NaN.
    rounded = TopK(one_hot.ids, torch.full_like(one_hot.logprobs, math.log(0.3)).half())
    assert_finite_with_finite_gradients(student, rounded, labels, tail)
    assert_finite_with_finite_gradients(teacher * 1e3, rounded, labels, tail)  # and a confident student


def test_minus_inf_logits_are_safe():
    student, teacher, labels = random_inputs(15)
    # Padded vocabulary rows, -inf on both sides: the loss is that of the vocabulary without them.
    padded = lambda logits: torch.cat([logits, torch.full((B, T, 3), -math.inf)], -1)  # noqa: E731
    for kind in KINDS:
        torch.testing.assert_close(
            distillation_loss(padded(student), padded(teacher), labels, kind=kind),
            distillation_loss(student, teacher, labels, kind=kind),
        )
    assert_finite_with_finite_gradients(padded(student), padded(teacher), labels)
    assert_finite_with_finite_gradients(padded(student), top_k_of(padded(teacher), K), labels)
    # A student giving -inf where the teacher has mass (and the reverse): large but finite.
    blocked = student.clone()
    blocked[..., :3] = -math.inf
    assert_finite_with_finite_gradients(blocked, teacher, labels)
    assert_finite_with_finite_gradients(teacher, blocked, labels)
    assert_finite_with_finite_gradients(blocked, top_k_of(teacher, K), labels, "renormalize")
    rest = torch.arange(3, V).expand(B, T, V - 3)  # the teacher's top-k is every id but the blocked ones
    top_rest = TopK(rest, teacher.log_softmax(-1).gather(-1, rest))
    assert_finite_with_finite_gradients(blocked, top_rest, labels)  # the student's bucket is exactly empty


@pytest.mark.parametrize("teacher_type", TEACHERS)
def test_whatever_masked_rows_hold_does_not_matter(teacher_type):
    hidden, weight, teacher_logits, labels = hidden_inputs(16)
    teacher, tail = teacher_and_tail(teacher_logits, teacher_type)
    garbage_logits, garbage_hidden = hidden @ weight.T, hidden.detach().clone()
    garbage_logits = garbage_logits.detach().clone()
    garbage_logits[0, :2], garbage_hidden[0, :2] = math.nan, math.inf  # positions whose label is -100
    garbage_logits.requires_grad_(), garbage_hidden.requires_grad_()
    clean = distillation_loss(hidden @ weight.T, teacher, labels, kind="jsd", tail=tail)
    for loss, leaf in (
        (distillation_loss(garbage_logits, teacher, labels, kind="jsd", tail=tail), garbage_logits),
        (
            distillation_loss_from_hidden(garbage_hidden, weight, teacher, labels, kind="jsd", tail=tail, chunk_size=3),
            garbage_hidden,
        ),
    ):
        torch.testing.assert_close(loss, clean)
        (grad,) = torch.autograd.grad(loss, leaf)
        assert torch.isfinite(grad).all() and grad[0, :2].eq(0).all()


def test_forward_kl_is_distillation_loss_forward_kl():
    student, teacher, labels = random_inputs(17)
    for target in (teacher, top_k_of(teacher, K)):
        torch.testing.assert_close(
            forward_kl(student, target, labels), distillation_loss(student, target, labels, kind="forward_kl")
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(kind="jsd", beta=0.0), "jsd needs 0 < beta < 1.*kind='forward_kl' or kind='reverse_kl'"),
        (dict(kind="jsd", beta=1.0), "jsd needs 0 < beta < 1"),
        (dict(kind="jsd", beta=1.5), "jsd needs 0 < beta < 1"),
        (dict(kind="skew_forward_kl", alpha=0.0), "skew_forward_kl needs 0 < alpha < 1.*kind='forward_kl'"),
        (dict(kind="skew_reverse_kl", alpha=1.0), "skew_reverse_kl needs 0 < alpha < 1.*kind='reverse_kl'"),
        (dict(kind="skew_reverse_kl", alpha=-0.1), "skew_reverse_kl needs 0 < alpha < 1"),
        (
            dict(kind="kl"),
            "kind must be one of forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd; got 'kl'",
        ),
        (dict(kind="forward_kl", tail="drop"), "tail must be 'bucket'.*or 'renormalize'.*got 'drop'"),
        (dict(kind="forward_kl", temperature=0.0), "temperature must be > 0"),
    ],
)
def test_bad_options_are_refused_with_the_fix(options, message):
    student, teacher, labels = random_inputs()
    hidden, weight, _, _ = hidden_inputs()
    with pytest.raises(ValueError, match=message):
        distillation_loss(student, teacher, labels, **options)
    with pytest.raises(ValueError, match=message):
        distillation_loss_from_hidden(hidden, weight, teacher, labels, chunk_size=4, **options)


def test_bad_shapes_and_chunk_size_are_refused():
    student, teacher, labels = random_inputs()
    hidden, weight, _, _ = hidden_inputs()
    with pytest.raises(ValueError, match="labels is"):
        distillation_loss(student, teacher, labels[:, 1:], kind="forward_kl")
    with pytest.raises(ValueError, match="slice padded vocabulary rows"):
        distillation_loss(student, teacher[..., :-1], labels, kind="forward_kl")
    with pytest.raises(ValueError, match="TopK ids"):
        distillation_loss(student, TopK(*top_k_of(teacher, K)[:1], torch.zeros(B, T, K + 1)), labels, kind="forward_kl")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        distillation_loss_from_hidden(hidden, weight, teacher, labels, kind="forward_kl", chunk_size=0)


def test_fused_takes_shifted_slices_as_train_passes_them():
    hidden, weight, teacher_logits, labels = hidden_inputs(19)
    top = top_k_of(teacher_logits, K)
    # logits at t predict the token at t+1: non-contiguous slices, as in DistillationTrainer.compute_loss
    shifted = dict(labels=labels[:, 1:], kind="skew_reverse_kl", temperature=1.5)
    for teacher in (teacher_logits[:, 1:], TopK(top.ids[:, 1:], top.logprobs[:, 1:])):
        fused = distillation_loss_from_hidden(hidden[:, :-1], weight, teacher, chunk_size=3, **shifted)
        unfused = distillation_loss((hidden @ weight.T)[:, :-1], teacher, **shifted)
        for expected, actual in zip(
            loss_and_gradients(unfused, hidden, weight), loss_and_gradients(fused, hidden, weight)
        ):
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


# --- the dense teacher's closed-form gradient against autograd ------------------------------------


def autograd_reference(student, teacher, labels, kind, beta=0.5, alpha=0.1, temperature=1.0):
    """The dense loss written with plain torch ops (floored log-probs, logaddexp mixtures), for autograd to
    differentiate: the formulas losses.py evaluated before it wrote the gradient out by hand."""
    counted = labels != -100
    log_q = (student[counted].float() / temperature).log_softmax(-1).clamp(min=-1e4)
    log_p = (teacher[counted].float() / temperature).log_softmax(-1).clamp(min=-1e4)
    kl = lambda log_a, log_b: (log_a.exp() * (log_a - log_b)).sum(-1)  # noqa: E731
    mixture = lambda log_a, log_b, w: torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))  # noqa: E731
    per_position = {
        "forward_kl": lambda: kl(log_p, log_q),
        "reverse_kl": lambda: kl(log_q, log_p),
        "jsd": lambda: (
            beta * kl(log_p, mixture(log_p, log_q, beta)) + (1 - beta) * kl(log_q, mixture(log_p, log_q, beta))
        ),
        "skew_forward_kl": lambda: kl(log_p, mixture(log_p, log_q, alpha)),
        "skew_reverse_kl": lambda: kl(log_q, mixture(log_q, log_p, alpha)),
        "tvd": lambda: 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1),
    }[kind]()
    return temperature**2 * per_position.sum() / counted.sum().clamp(min=1)


def with_extremes(student, teacher):
    """Three padded vocabulary rows (−inf on both sides), and ids only one side rules out (−inf on one side)."""
    padding = torch.full((B, T, 3), -math.inf)
    student, teacher = torch.cat([student, padding], -1), torch.cat([teacher, padding], -1)
    student[..., 0] = -math.inf  # the teacher has mass here: forward KL's floor, whose clamp passes no gradient
    teacher[..., 1] = -math.inf  # the student has mass here
    return student, teacher


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("extremes", [False, True])
@pytest.mark.parametrize("block_rows", [1, 3, None])  # rows per block: one, some, all at once
def test_dense_gradient_equals_autograd(kind, temperature, extremes, block_rows, monkeypatch):
    student, teacher, labels = random_inputs(20)
    labels[1, 2] = -100  # a masked position between counted ones: the rows are walked in runs around it
    if extremes:
        student, teacher = with_extremes(student, teacher)
    if block_rows is not None:
        monkeypatch.setattr(losses, "_CPU_BLOCK_ELEMENTS", block_rows * student.shape[-1])
    options = dict(kind=kind, beta=0.3, alpha=0.2, temperature=temperature)
    student = student.requires_grad_()
    upstream = 0.37  # the backward pass scales the gradient kept from the forward pass
    expected = autograd_reference(student, teacher, labels, **options)
    actual = distillation_loss(student, teacher, labels, **options)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    (expected_grad,) = torch.autograd.grad(upstream * expected, student)
    (grad,) = torch.autograd.grad(upstream * actual, student)
    assert torch.isfinite(grad).all() and grad[0, :2].eq(0).all() and grad[1, 2].eq(0).all()
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)

    hidden, weight, _, _ = hidden_inputs(21)
    if extremes:  # the fused path's logits are finite; only the teacher keeps its −inf
        teacher = teacher[..., :V]
    expected = upstream * autograd_reference(hidden @ weight.T, teacher, labels, **options)
    fused = upstream * distillation_loss_from_hidden(hidden, weight, teacher, labels, chunk_size=4, **options)
    for expected_part, actual_part in zip(
        loss_and_gradients(expected, hidden, weight), loss_and_gradients(fused, hidden, weight)
    ):
        torch.testing.assert_close(actual_part, expected_part, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_rows", [1, 2, 5])
@pytest.mark.parametrize("teacher_type", TEACHERS)
def test_blocks_of_rows_equal_one_block(block_rows, teacher_type, monkeypatch):
    """The unfused and fused paths walk rows in blocks (a few per block on a CPU): any block size gives the same."""
    hidden, weight, teacher_logits, labels = hidden_inputs(22)
    labels[1, 1] = -100
    teacher, tail = teacher_and_tail(teacher_logits, teacher_type)
    options = dict(kind="skew_reverse_kl", tail=tail, temperature=1.5)

    def losses_and_gradients():
        unfused = distillation_loss(hidden @ weight.T, teacher, labels, **options)
        fused = distillation_loss_from_hidden(hidden, weight, teacher, labels, chunk_size=3, **options)
        return loss_and_gradients(unfused, hidden, weight) + loss_and_gradients(fused, hidden, weight)

    one_block = losses_and_gradients()
    monkeypatch.setattr(losses, "_CPU_BLOCK_ELEMENTS", block_rows * V)
    for expected, actual in zip(one_block, losses_and_gradients()):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def test_dense_without_gradients_and_with_a_student_that_needs_none():
    student, teacher, labels = random_inputs(23)
    expected = distillation_loss(student.clone().requires_grad_(), teacher, labels, kind="jsd").detach()
    with torch.no_grad():
        torch.testing.assert_close(distillation_loss(student.requires_grad_(), teacher, labels, kind="jsd"), expected)
    torch.testing.assert_close(distillation_loss(student.detach(), teacher, labels, kind="jsd"), expected)


def test_top_k_logprobs_equals_log_softmax_top_k_for_strided_and_bf16_logits():
    """The online teacher's top-k, block by block: the same as whole-tensor log_softmax + topk."""
    logits = torch.randn(3, 9, 50)
    expected_values, expected_ids = logits.log_softmax(-1).topk(5, dim=-1)
    got = top_k_logprobs(logits[:, :-1], 5)  # a strided view, as the trainer passes it
    assert torch.equal(got.ids, expected_ids[:, :-1]) and torch.allclose(got.logprobs, expected_values[:, :-1])
    half = top_k_logprobs(logits.bfloat16(), 5)
    assert half.logprobs.dtype == torch.float32
    torch.testing.assert_close(half.logprobs, logits.bfloat16().float().log_softmax(-1).topk(5, dim=-1).values)
