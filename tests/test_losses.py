"""Loss properties: zero for identical distributions, top-k with k = V equals dense, masking, gradients."""

import torch
import torch.nn.functional as F

from stillhouse.training.losses import TopK, cross_entropy, forward_kl

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


def test_top_k_with_full_vocabulary_equals_dense():
    student, teacher, labels = random_inputs(1)
    torch.testing.assert_close(forward_kl(student, top_k_of(teacher, V), labels), forward_kl(student, teacher, labels), atol=1e-4, rtol=1e-4)


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
