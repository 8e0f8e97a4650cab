"""Cross-tokenizer KD through training (``train.kd.align: byte | uld``).

The teacher is the bundled demo teacher (character-level, trained on the demo tasks); the student is a tiny
random Llama with its own byte-level BPE tokenizer, trained here on demo text with `tokenizers`. Nothing is
downloaded. The stored top-k goes through `build_examples` and `PadCollator` into the trainer's loss; a live
teacher (in memory, or behind the loopback OpenAI-compatible server) scores the response in its own tokens.
"""

import math
from pathlib import Path

import pytest
import torch
from conftest import model_ref
from openai_server import FakeOpenAIServer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainingArguments

import stillhouse.demo
from stillhouse.config import (
    CurateConfig,
    EvaluateConfig,
    KDConfig,
    OpenAIEngineConfig,
    SampleConfig,
    TrainConfig,
    parse_config,
)
from stillhouse.data.curate import curate
from stillhouse.demo.tasks import make_examples
from stillhouse.demo.tiny_models import bpe_tokenizer
from stillhouse.errors import InputError
from stillhouse.evaluation.stage import evaluate_student
from stillhouse.models import load_tokenizer
from stillhouse.preflight import preflight
from stillhouse.sampling.sample import sample_teacher
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.store import Store
from stillhouse.training.checks import check_vocabularies
from stillhouse.training.cross_tokenizer import (
    CrossTargets,
    check_kd_tokenizers,
    cross_tokenizer_loss,
    pair_tokenizers,
    response_targets,
)
from stillhouse.training.examples import PadCollator, build_examples
from stillhouse.training.losses import KINDS, TopK, distillation_loss
from stillhouse.training.served_teacher import ServedTeacher
from stillhouse.training.stage import train_student
from stillhouse.training.train import DistillationTrainer

DEMO_TEACHER = Path(stillhouse.demo.__file__).parent / "teacher"
K = 8
ARCHITECTURE = {"hidden_size": 32, "num_layers": 2, "intermediate_size": 64, "num_heads": 2}


def build_bpe_student(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama with a byte-level BPE tokenizer (a few hundred merges, ChatML) trained on demo text."""
    texts = [f"{row['prompt']}\n{row['reference']}" for row in make_examples(2000, seed=seed + 100)]
    tokenizer = bpe_tokenizer(texts, vocab_size=600)  # 256 bytes + 3 specials + ~340 merges
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bpe_student(tmp_path_factory) -> Path:
    return build_bpe_student(tmp_path_factory.mktemp("bpe-student"))


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, prompts_jsonl):
    """(store, dataset, samples): the demo prompts answered by the demo teacher with its top-8 stored."""
    store = Store(tmp_path_factory.mktemp("cross-store"))
    dataset = curate(CurateConfig(source=str(prompts_jsonl), category_column="task", eval_fraction=0.2), store)
    samples = sample_teacher(
        SampleConfig(teacher=str(DEMO_TEACHER), max_new_tokens=12, top_k_logprobs=K, batch_size=64), dataset, store
    )
    return store, dataset, samples


@pytest.fixture(scope="module")
def tokenizers(bpe_student):
    """(teacher's character tokenizer, student's BPE tokenizer, their `TokenizerPair`)."""
    teacher, student = load_tokenizer(str(DEMO_TEACHER)), load_tokenizer(str(bpe_student))
    return teacher, student, pair_tokenizers(teacher, student)


def kd_config(student: Path, **kd) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "student": str(student),
            "method": "kd",
            "max_steps": 40,
            "batch_size": 16,
            "learning_rate": 0.01,
            "warmup_ratio": 0.0,
            "ce_weight": 0.0,  # only the KD term teaches: a lower KL is its doing
            "logging_steps": 10,
            "device": "cpu",
            "kd": kd,
        }
    )


def shifted(batch: dict) -> CrossTargets:
    return CrossTargets(batch["cross_ids"][:, 1:], batch["cross_logprobs"][:, 1:], batch["cross_mask"][:, 1:])


# --- the vocabulary rule -------------------------------------------------------------------------


def test_without_align_a_student_with_its_own_tokenizer_is_refused_naming_kd_align(sampled, bpe_student, tokenizers):
    store, dataset, samples = sampled
    teacher, student, _ = tokenizers
    outputs_before = sorted((store.root / "train").glob("*"))
    with pytest.raises(InputError, match=r"tokenize differently\. Set train\.kd\.align: byte \(or uld\)"):
        train_student(kd_config(bpe_student), dataset, samples, store)
    assert sorted((store.root / "train").glob("*")) == outputs_before  # refused before the store was touched
    # With align set the same pair is accepted (and what differs is still reported); one vocabulary passes either way.
    for align in ("byte", "uld"):
        assert "student-only tokens" in check_vocabularies(kd_config(bpe_student, align=align), teacher)
        assert check_kd_tokenizers(teacher, student, align) is not None
    assert check_kd_tokenizers(teacher, teacher, "none") is None
    assert check_kd_tokenizers(teacher, teacher, "byte") is None


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"loss_chunk_size": 16, "kd": {"align": "uld"}}, r"align: uld sorts .*set train\.loss_chunk_size: null"),
        ({"kd": {"align": "byte", "teacher": "online"}}, r"online_top_k is null .*set train\.kd\.online_top_k"),
    ],
)
def test_align_settings_the_cross_tokenizer_path_cannot_run_are_refused(bpe_student, tokenizers, changes, message):
    teacher, _, _ = tokenizers
    config = TrainConfig.model_validate({**kd_config(bpe_student).model_dump(), **changes})
    with pytest.raises(InputError, match=message):
        check_vocabularies(config, teacher)


# --- stored top-k: built once, carried by the collator ---------------------------------------------


def test_examples_carry_the_mapped_top_k_at_the_label_positions(sampled, tokenizers):
    _, dataset, samples = sampled
    teacher, student, pair = tokenizers
    examples = build_examples(
        dataset, samples, student, split="train", shared_vocabulary=False, with_top_k=True, max_seq_len=28,
        align="byte", pair=pair,
    )  # fmt: skip
    rows = read_teacher_outputs(samples.path, split="train")
    assert len(examples) == len(rows) and "top_k_ids" not in examples[0]
    truncated = 0
    for example, row in zip(examples, rows.itertuples(index=False)):
        start, length = example["prompt_length"], len(example["input_ids"])
        assert example["cross_ids"].shape == (length, K) and example["cross_mask"].shape == (length,)
        assert not example["cross_mask"][:start].any()  # the prompt has no KD target
        student_ids = student(row.response_text, add_special_tokens=False)["input_ids"] + [student.eos_token_id]
        one = response_targets(
            pair,
            "byte",
            teacher_ids=list(row.response_token_ids),
            teacher=TopK(torch.tensor(row.top_k_ids).long(), torch.tensor(row.top_k_logprobs)),
            tail=torch.tensor(row.tail_logprobs),
            text=row.response_text,
            student_ids=student_ids,
        )
        kept = length - start
        truncated += kept < len(student_ids)
        assert torch.equal(example["cross_mask"][start:], one.mask[:kept])
        assert torch.equal(example["cross_ids"][start:], one.ids[:kept])
        torch.testing.assert_close(example["cross_logprobs"][start:], one.logprobs[:kept])
        # A character teacher has a token at every byte: every BPE position of the response has a target.
        assert one.mask.all()
    assert truncated > 0  # max_seq_len cut some responses: their targets were cut with them
    batch = PadCollator(student.pad_token_id)(examples[:5])
    width = batch["input_ids"].shape[1]
    assert batch["cross_ids"].shape == (5, width, K) and batch["cross_mask"].dtype == torch.bool
    for row, example in enumerate(examples[:5]):
        length = len(example["input_ids"])
        assert torch.equal(batch["cross_ids"][row, :length], example["cross_ids"])
        assert not batch["cross_mask"][row, length:].any()
        # The mapped mass is at most 1 (the residual, losses.py's bucket, is the rest; stored log-probs are within
        # 1e-3 each) and most of it: a character's mass lands on the BPE's byte token of that character.
        counted = example["cross_mask"]
        mapped = example["cross_logprobs"][counted].logsumexp(-1).exp()
        assert (mapped <= 1 + 3e-3).all() and (mapped > 0.5).all()


def test_byte_examples_with_identical_tokenizers_give_the_same_tokenizer_loss(sampled):
    _, dataset, samples = sampled
    teacher = load_tokenizer(str(DEMO_TEACHER))
    common = {"split": "eval", "shared_vocabulary": True, "with_top_k": True, "max_seq_len": 64}
    same = PadCollator(teacher.pad_token_id)(build_examples(dataset, samples, teacher, **common))
    cross = PadCollator(teacher.pad_token_id)(
        build_examples(dataset, samples, teacher, **common, align="byte", pair=pair_tokenizers(teacher, teacher))
    )
    assert torch.equal(same["labels"], cross["labels"])
    labels = same["labels"][:, 1:]
    assert torch.equal(cross["cross_mask"][:, 1:], labels.ne(-100))  # every response position aligned
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(*labels.shape, len(teacher), generator=generator)
    stored = TopK(same["top_k_ids"][:, 1:], same["top_k_logprobs"][:, 1:])
    for kind in KINDS:
        expected = distillation_loss(logits, stored, labels, kind=kind)
        got = cross_tokenizer_loss(logits, shifted(cross), labels, align="byte", kind=kind)
        # Within 1e-5, relative where the loss is large: this confident teacher leaves a bucket (1 − Σ top-k) near 0,
        # whose log (reverse KL ≈ 17) magnifies fp32 rounding of Σ, summed in another order (the byte path sorts ids).
        assert abs(got.item() - expected.item()) < 1e-5 * max(1.0, expected.item()), (kind, got.item(), expected)


# --- a live teacher: in memory, served, on-policy --------------------------------------------------


def live_trainer(tmp_path, student_folder: Path, pair, kd: dict, teacher, **options) -> DistillationTrainer:
    student = AutoModelForCausalLM.from_pretrained(student_folder)
    arguments = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", seed=0)
    return DistillationTrainer(
        model=student,
        args=arguments,
        ce_weight=0.0,
        kd_weight=1.0,
        kd=KDConfig.model_validate(kd),
        vocab_size=len(pair.student),
        teacher=teacher,
        pad_token_id=pair.student.pad_token_id,
        eos_token_id=pair.student.eos_token_id,
        pair=pair,
        **options,
    )


@pytest.fixture(scope="module")
def live_batches(sampled, tokenizers):
    """(stored batch, live batch): the same 6 eval responses, with the mapped stored top-k / with teacher prompts."""
    _, dataset, samples = sampled
    _, student, pair = tokenizers
    common = {"split": "eval", "shared_vocabulary": False, "max_seq_len": 200, "align": "byte", "pair": pair}
    stored = build_examples(dataset, samples, student, with_top_k=True, **common)[:6]
    live = build_examples(dataset, samples, student, with_top_k=False, with_teacher_prompts=True, **common)[:6]
    collate = PadCollator(student.pad_token_id, with_prompts=True)
    return collate(stored), collate(live)


def assert_targets_agree(got: CrossTargets, expected: CrossTargets, *, atol: float) -> None:
    """Where ``expected`` has a target ``got`` has the same ids and log-probs (a near-tie at rank k may swap one)."""
    assert got.mask[expected.mask].all() and expected.mask.sum() > 20
    same_ids = (got.ids == expected.ids).all(-1) & expected.mask
    assert same_ids.sum() >= 0.95 * expected.mask.sum()
    torch.testing.assert_close(got.logprobs[same_ids], expected.logprobs[same_ids], atol=atol, rtol=0)


def test_the_chunked_byte_loss_equals_the_whole_logits_one_in_the_trainer(
    tmp_path, bpe_student, tokenizers, live_batches
):
    _, _, pair = tokenizers
    stored_batch, _ = live_batches
    kd = {"align": "byte", "kind": "jsd"}
    losses = []
    for chunk in (None, 5):
        trainer = live_trainer(tmp_path, bpe_student, pair, kd, None, loss_chunk_size=chunk)
        model = trainer.model.train()
        loss = trainer.compute_loss(model, dict(stored_batch))
        loss.backward()
        losses.append((loss.item(), model.get_input_embeddings().weight.grad.clone()))
    (whole, whole_grad), (chunked, chunked_grad) = losses
    assert whole > 0 and chunked == pytest.approx(whole, rel=1e-5)
    torch.testing.assert_close(chunked_grad, whole_grad, rtol=1e-4, atol=1e-7)


def test_an_online_teacher_scores_the_response_in_its_own_tokens_like_the_stored_top_k(
    tmp_path, bpe_student, tokenizers, live_batches
):
    _, _, pair = tokenizers
    stored_batch, live_batch = live_batches
    assert live_batch["teacher_prompt_ids"][0][-1] == pair.teacher.convert_tokens_to_ids("<|assistant|>")
    teacher = AutoModelForCausalLM.from_pretrained(DEMO_TEACHER).requires_grad_(False)
    trainer = live_trainer(
        tmp_path, bpe_student, pair, {"teacher": "online", "online_top_k": K, "align": "byte"}, teacher
    )
    cross = {key: live_batch[key] for key in ("teacher_prompt_ids", "response_text")}
    online = trainer.cross_tokenizer_targets(live_batch["labels"], cross)
    # Stored log-probs are fixed-point (within 1e-3) and came from batched generation: close, not equal.
    assert_targets_agree(online, shifted(stored_batch), atol=3e-3)


def test_a_served_teacher_gives_the_online_teachers_targets(tmp_path, bpe_student, tokenizers, live_batches):
    _, _, pair = tokenizers
    _, live_batch = live_batches
    cross = {key: live_batch[key] for key in ("teacher_prompt_ids", "response_text")}
    teacher = AutoModelForCausalLM.from_pretrained(DEMO_TEACHER).requires_grad_(False)
    kd = {"teacher": "online", "online_top_k": K, "align": "byte"}
    online = live_trainer(tmp_path, bpe_student, pair, kd, teacher).cross_tokenizer_targets(live_batch["labels"], cross)
    with FakeOpenAIServer(DEMO_TEACHER, served_name="demo") as server:
        endpoint = OpenAIEngineConfig(base_url=server.url, api_key_env=None, backoff_seconds=0.0)
        served_teacher = ServedTeacher(endpoint, "demo", top_k=K)
        kd = {"teacher": "served", "online_top_k": K, "align": "byte", "served": endpoint.model_dump()}
        try:
            trainer = live_trainer(tmp_path, bpe_student, pair, kd, served_teacher)
            served = trainer.cross_tokenizer_targets(live_batch["labels"], cross)
        finally:
            served_teacher.close()
        sent = [request["body"]["prompt"] for request in server.requests if request["path"] == "/v1/completions"]
    # The server was sent the teacher's own tokens: its chat-template prompt, then the response re-tokenized.
    assert sent and all(max(ids) < len(pair.teacher) for ids in sent)
    assert any(ids[: len(live_batch["teacher_prompt_ids"][0])] == live_batch["teacher_prompt_ids"][0] for ids in sent)
    assert torch.equal(served.mask, online.mask)
    assert_targets_agree(served, online, atol=1e-4)


@pytest.mark.parametrize("align", ["byte", "uld"])
def test_on_policy_rollouts_are_scored_by_the_teacher_across_tokenizers(
    tmp_path, bpe_student, tokenizers, live_batches, align
):
    _, _, pair = tokenizers
    _, live_batch = live_batches
    teacher = AutoModelForCausalLM.from_pretrained(DEMO_TEACHER).requires_grad_(False)
    kd = {"teacher": "online", "online_top_k": K, "align": align, "lmbda": 1.0, "rollout_max_new_tokens": 10}
    trainer = live_trainer(tmp_path, bpe_student, pair, kd, teacher)
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(live_batch))  # compute_loss pops entries: a copy
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    gradient = model.get_input_embeddings().weight.grad
    assert gradient is not None and gradient.abs().sum() > 0


# --- end to end: sample, train, held-out KL -------------------------------------------------------


def held_out_losses(model_folder: Path, dataset, samples, student, pair) -> dict[str, float]:
    """On the eval split's aligned response positions: ``kl``, the forward KL (teacher ‖ student) through the byte
    mapping (its bucket holds the residual), and ``uld``, the ULD loss (exact-match weight 1)."""
    model = AutoModelForCausalLM.from_pretrained(model_folder).eval()
    losses = {}
    for align in ("byte", "uld"):
        examples = build_examples(
            dataset, samples, student, split="eval", shared_vocabulary=False, with_top_k=True, max_seq_len=512,
            align=align, pair=pair,
        )  # fmt: skip
        batch = PadCollator(student.pad_token_id)(examples)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        losses["kl" if align == "byte" else "uld"] = cross_tokenizer_loss(
            logits, shifted(batch), batch["labels"][:, 1:], align=align, kind="forward_kl", uld_exact_weight=1.0
        ).item()
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("align", ["byte", "uld"])
def test_a_bpe_student_learns_a_character_teacher_and_the_held_out_kl_falls(sampled, bpe_student, tokenizers, align):
    store, dataset, samples = sampled
    _, student, pair = tokenizers
    before = held_out_losses(bpe_student, dataset, samples, student, pair)
    trained = train_student(kd_config(bpe_student, align=align), dataset, samples, store)
    after = held_out_losses(Path(trained.model_path), dataset, samples, student, pair)
    assert all(math.isfinite(value) for value in after.values())
    if align == "byte":  # KL is what it minimizes
        assert after["kl"] < 0.6 * before["kl"], (before, after)
    else:  # its own loss falls clearly; the KL with it, less (W1 over sorted vectors ignores which token is which)
        assert after["uld"] < 0.6 * before["uld"] and after["kl"] < 0.9 * before["kl"], (before, after)
    assert load_tokenizer(trained.model_path).get_vocab() == student.get_vocab()  # the student keeps its tokenizer


def test_preflight_accepts_a_student_with_its_own_tokenizer_only_with_align(pipeline_raw, bpe_student):
    pipeline_raw["sample"]["teacher"] = str(DEMO_TEACHER)
    pipeline_raw["train"].pop("architecture")
    pipeline_raw["train"].update(student=str(bpe_student), method="kd")
    with pytest.raises(InputError, match=r"Set train\.kd\.align: byte \(or uld\) to distill across tokenizers"):
        preflight(parse_config(pipeline_raw))
    pipeline_raw["train"]["kd"] = {"align": "byte"}
    preflight(parse_config(pipeline_raw))


def test_evaluation_reports_the_kl_of_a_student_with_its_own_tokenizer(sampled, bpe_student, tokenizers, tmp_path):
    """The evaluate stage compares a student of another family with the teacher through the byte mapping: its
    ``kl_teacher_student`` is the forward KL on the mapped top-k at the aligned response positions, the same
    figure the training loss of ``align: byte`` would give on the eval split."""
    _, dataset, samples = sampled
    _, student, pair = tokenizers
    student_ref = model_ref(bpe_student, "bpe-student")
    config = EvaluateConfig(max_new_tokens=8, batch_size=16, metrics=["kl", "agreement", "perplexity"])
    metrics = evaluate_student(config, dataset, samples, student_ref, Store(tmp_path)).metrics
    expected = held_out_losses(bpe_student, dataset, samples, student, pair)["kl"]
    assert metrics["kl_teacher_student"] == pytest.approx(expected, rel=1e-4)
    assert 0.0 <= metrics["student_top1_agreement"] <= 1.0 and math.isfinite(metrics["student_perplexity"])
