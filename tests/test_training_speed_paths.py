"""The fast training paths give the losses of the plain ones.

- Offline top-k targets are tensors of the response positions, collated by slicing: the batch equals the one the
  old path built from nested lists with k zeros per prompt position.
- The loss scores only the window of positions from the first response token on (student and teacher logits):
  equal to scoring every position, for stored, online dense and online top-k teachers, chunked or not, on
  teacher responses and on the student's rollouts.
- Rollouts from `sample_rollouts` are `generate`'s tokens under the same seed.
- An off-policy batch of on-policy training takes the stored top-k when it is the online teacher's top-k: no teacher
  forward, the teacher's loss within the stored values' rounding.
"""

import pytest
import torch
from conftest import curate_and_sample

from stillhouse.config import TrainConfig
from stillhouse.training.examples import PadCollator, build_examples
from stillhouse.training.losses import TopK, cross_entropy, distillation_loss
from stillhouse.training.train import build_trainer, reuses_stored_top_k, sample_rollouts

ARCHITECTURE = {"hidden_size": 16, "num_layers": 2, "intermediate_size": 32, "num_heads": 2}
STORED_K = 4  # curate_and_sample stores the teacher's top-4


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_teacher, prompts_jsonl):
    return curate_and_sample(tmp_path_factory.mktemp("store"), tiny_teacher, prompts_jsonl)


def trainer_for(sampled, tmp_path, **changes):
    _, dataset, samples = sampled
    settings = {"architecture": ARCHITECTURE, "method": "kd", "max_steps": 1, "batch_size": 16, "threads": 1}
    settings.update(changes)
    trainer, _ = build_trainer(TrainConfig.model_validate(settings), dataset, samples, tmp_path)
    return trainer


def list_path_batch(examples: list[dict], rows, k: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """The batch as the old path built it: top-k as nested lists with k zeros per prompt position, turned into
    tensors example by example."""
    width = max(len(example["input_ids"]) for example in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), pad_token_id),
        "labels": torch.full((len(examples), width), -100),
        "top_k_ids": torch.zeros((len(examples), width, k), dtype=torch.long),
        "top_k_logprobs": torch.zeros((len(examples), width, k)),
    }
    for index, (example, row) in enumerate(zip(examples, rows)):
        prompt, length = example["prompt_length"], len(example["input_ids"])
        ids = ([[0] * k] * prompt + [list(ids) for ids in row.top_k_ids])[:length]
        logprobs = ([[0.0] * k] * prompt + [list(lp) for lp in row.top_k_logprobs])[:length]
        batch["input_ids"][index, :length] = torch.tensor(example["input_ids"])
        batch["labels"][index, :length] = torch.tensor(example["labels"])
        batch["top_k_ids"][index, :length] = torch.tensor(ids)
        batch["top_k_logprobs"][index, :length] = torch.tensor(logprobs)
    return batch


@pytest.mark.parametrize("cut", [False, True])
def test_offline_top_k_tensors_collate_to_the_list_paths_batch(sampled, tiny_teacher, cut):
    from stillhouse.models import load_tokenizer
    from stillhouse.sampling.teacher_outputs import read_teacher_outputs

    _, dataset, samples = sampled
    tokenizer = load_tokenizer(str(tiny_teacher))
    common = {"split": "train", "shared_vocabulary": True, "with_top_k": True}
    examples = build_examples(dataset, samples, tokenizer, **common, max_seq_len=512)[:12]
    if cut:  # every example loses its last response token (and its top-k) to max_seq_len
        shortest = min(len(example["input_ids"]) for example in examples)
        examples = build_examples(dataset, samples, tokenizer, **common, max_seq_len=shortest - 1)[:12]
    rows = list(read_teacher_outputs(samples.path, split="train").itertuples(index=False))[:12]
    for example, row in zip(examples, rows):  # no prompt positions stored (a prompt may be cut too)
        kept = max(len(example["input_ids"]) - example["prompt_length"], 0)
        assert example["response_top_k_ids"].shape == (kept, STORED_K)
        assert example["response_top_k_logprobs"].dtype == torch.float32
        assert (kept < len(row.top_k_ids)) == cut
    batch = PadCollator(tokenizer.pad_token_id)(examples)
    expected = list_path_batch(examples, rows, STORED_K, tokenizer.pad_token_id)
    for key, values in expected.items():
        assert batch[key].dtype == values.dtype and torch.equal(batch[key], values), key


def full_position_loss(trainer, inputs: dict, labels: torch.Tensor, stored: TopK | None, ce_weight: float):
    """The loss as it was computed before the window: logits and teacher at every shifted position."""
    kd, vocab_size = trainer.kd, trainer.vocab_size
    logits = trainer.model(**inputs).logits[:, :-1, :vocab_size]
    targets = labels[:, 1:]
    loss = ce_weight * cross_entropy(logits, targets)
    if stored is not None:
        teacher = TopK(stored.ids[:, 1:], stored.logprobs[:, 1:])
    else:
        with torch.no_grad():
            teacher = trainer.teacher(**inputs).logits[:, :-1, :vocab_size].float()
        if kd.online_top_k is not None:
            values, ids = teacher.log_softmax(-1).topk(kd.online_top_k, dim=-1)
            teacher = TopK(ids, values)
    options = {"kind": kd.kind, "beta": kd.beta, "alpha": kd.alpha, "temperature": kd.temperature, "tail": kd.tail}
    return loss + trainer.kd_weight * distillation_loss(logits, teacher, targets, **options)


TEACHERS = [
    {},  # the stored top-k
    {"teacher": "online", "kind": "jsd", "beta": 0.3},
    {"teacher": "online", "online_top_k": 3, "kind": "reverse_kl", "temperature": 2.0},
]


@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("kd", TEACHERS)
def test_scoring_the_response_window_equals_scoring_every_position(sampled, tmp_path, kd, chunk):
    trainer = trainer_for(sampled, tmp_path, kd=kd, ce_weight=0.5, loss_chunk_size=chunk)
    batch = trainer.data_collator(trainer.train_dataset[:16])
    stored = TopK(batch["top_k_ids"], batch["top_k_logprobs"]) if "top_k_ids" in batch else None
    plain = {key: batch[key] for key in ("input_ids", "attention_mask")}
    assert batch["labels"][:, 1:].ne(-100).float().argmax(-1).min() > 5  # a window to leave out
    windowed = trainer.compute_loss(trainer.model, dict(batch))
    expected = full_position_loss(trainer, plain, batch["labels"], stored, ce_weight=0.5)
    torch.testing.assert_close(windowed, expected, rtol=1e-5, atol=1e-6)
    gradients = torch.autograd.grad(windowed, list(trainer.model.parameters()))
    expected_gradients = torch.autograd.grad(expected, list(trainer.model.parameters()))
    for got, want in zip(gradients, expected_gradients):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kd", TEACHERS[1:])
def test_an_on_policy_batch_scores_the_rollout_window_like_every_position(sampled, tmp_path, kd):
    trainer = trainer_for(sampled, tmp_path, kd={**kd, "lmbda": 1.0, "rollout_max_new_tokens": 6})
    batch = trainer.data_collator(trainer.train_dataset[:16])
    trainer.model.train()
    torch.manual_seed(0)
    windowed = trainer.compute_loss(trainer.model, dict(batch))
    torch.manual_seed(0)
    inputs, labels = trainer.student_rollout(trainer.model, batch["prompt_input_ids"], batch["prompt_attention_mask"])
    expected = full_position_loss(trainer, inputs, labels, None, ce_weight=0.0)
    torch.testing.assert_close(windowed, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollouts_are_generates_tokens_under_the_same_seed(tiny_teacher, temperature):
    from transformers import AutoModelForCausalLM

    from stillhouse.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_teacher))
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(5, len(tokenizer), (24, 12), generator=generator)
    mask = torch.ones_like(prompts)
    for row in range(24):  # left padding of 0..5 tokens
        padding = row % 6
        prompts[row, :padding], mask[row, :padding] = tokenizer.pad_token_id, 0
    settings = {"max_new_tokens": 20, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(3)
    ours = sample_rollouts(model, prompts, mask, temperature=temperature, **settings)
    torch.manual_seed(3)
    with torch.no_grad():
        expected = model.generate(
            input_ids=prompts, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
            **settings,
        )  # fmt: skip
    assert torch.equal(ours, expected)
    generated = ours[:, 12:]
    ended = generated.eq(tokenizer.eos_token_id).cumsum(-1).gt(0)
    assert ended[:, :-1].any()  # some rows ended early, so the padding after EOS was exercised


def test_off_policy_batches_reuse_the_stored_top_k_of_the_online_teacher(sampled, tmp_path):
    _, _, samples = sampled
    kd = {"teacher": "online", "lmbda": 0.5, "online_top_k": 3, "kind": "jsd"}
    trainer = trainer_for(sampled, tmp_path / "reuse", kd=kd)
    assert "response_top_k_ids" in trainer.train_dataset[0]
    batch = trainer.data_collator(trainer.train_dataset[:16])
    calls = []
    trainer.teacher.register_forward_hook(lambda *args: calls.append(1))
    trainer.model.eval()  # no rollout outside training: an off-policy batch
    reused = trainer.compute_loss(trainer.model, dict(batch))
    assert calls == []
    scored = trainer.compute_loss(trainer.model, {k: v for k, v in batch.items() if not k.startswith("top_k")})
    assert calls == [1]
    torch.testing.assert_close(reused, scored, rtol=5e-3, atol=1e-4)  # stored log-probs are rounded to 1e-3

    def config(**changes):
        return TrainConfig.model_validate({"architecture": ARCHITECTURE, "method": "kd", "kd": {**kd, **changes}})

    assert reuses_stored_top_k(config(), samples, shared_vocabulary=True)
    assert not reuses_stored_top_k(config(online_top_k=None), samples, shared_vocabulary=True)  # dense
    assert not reuses_stored_top_k(config(online_top_k=STORED_K + 1), samples, shared_vocabulary=True)
    assert not reuses_stored_top_k(config(lmbda=0.0), samples, shared_vocabulary=True)
    assert not reuses_stored_top_k(config(), samples, shared_vocabulary=False)


def test_adam_beta2_reaches_the_optimizer_and_the_fingerprint(sampled, tmp_path):
    from stillhouse.training.stage import LAUNCH_FIELDS

    trainer = trainer_for(sampled, tmp_path, method="sft", adam_beta2=0.98)
    trainer.create_optimizer()
    assert {group["betas"] for group in trainer.optimizer.param_groups} == {(0.9, 0.98)}
    # An optimizer setting changes what is trained: it is part of the train stage's fingerprint.
    assert "adam_beta2" not in LAUNCH_FIELDS
    assert TrainConfig(architecture=ARCHITECTURE).adam_beta2 == 0.999  # AdamW's (and transformers') default


def test_decay_ratio_is_part_of_the_fingerprint_only_where_the_schedule_reads_it():
    from stillhouse.training.stage import fingerprinted_settings

    def settings(**changes):
        return fingerprinted_settings(TrainConfig(architecture=ARCHITECTURE, **changes))

    assert settings(decay_ratio=0.1) == settings(decay_ratio=0.3)  # cosine: the same run, the same stored output
    assert "decay_ratio" not in settings()
    wsd = {"lr_scheduler": "warmup_stable_decay"}
    assert settings(**wsd, decay_ratio=0.1) != settings(**wsd, decay_ratio=0.3)
