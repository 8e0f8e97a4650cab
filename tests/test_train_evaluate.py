"""Training on transformers.Trainer (SFT and top-k KD) and evaluation against the teacher."""

import ast
import inspect

import pytest
from conftest import curate_and_sample, model_ref
from transformers import AutoModelForCausalLM

from stillhouse.config import EvaluateConfig, TrainConfig
from stillhouse.evaluation.stage import evaluate_student
from stillhouse.models import load_tokenizer
from stillhouse.training.examples import build_examples
from stillhouse.training.stage import train_student

ARCHITECTURE = {"hidden_size": 16, "num_layers": 2, "intermediate_size": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_teacher, prompts_jsonl):
    return curate_and_sample(tmp_path_factory.mktemp("store"), tiny_teacher, prompts_jsonl)


def imports_of(module) -> set[tuple[str, str]]:
    """(module, name) of every ``from module import name`` in a module's source."""
    tree = ast.parse(inspect.getsource(module))
    return {
        (node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names
    }


def test_training_and_evaluation_build_examples_from_their_own_module():
    """Evaluation reads no training internals: both stages take example building from `stillhouse.training.examples`."""
    from stillhouse.evaluation import evaluate
    from stillhouse.training import examples, train

    assert examples.build_examples.__module__ == examples.PadCollator.__module__ == "stillhouse.training.examples"
    for stage in (train, evaluate):
        assert {
            ("stillhouse.training.examples", "build_examples"),
            ("stillhouse.training.examples", "PadCollator"),
        } <= imports_of(stage)
        assert stage.build_examples is examples.build_examples and stage.PadCollator is examples.PadCollator
    assert not [name for module, name in imports_of(evaluate) if module == "stillhouse.training.train"]


def test_examples_mask_the_prompt_and_align_top_k_with_labels(sampled, tiny_teacher):
    _, dataset, samples = sampled
    tokenizer = load_tokenizer(str(tiny_teacher))
    example = build_examples(
        dataset, samples, tokenizer, split="train", shared_vocabulary=True, with_top_k=True, max_seq_len=512
    )[0]
    prompt_length = example["labels"].count(-100)
    assert example["labels"][:prompt_length] == [-100] * prompt_length
    assert example["labels"][prompt_length:] == example["input_ids"][prompt_length:]
    assert tokenizer.decode(example["input_ids"][:prompt_length]).endswith("<|assistant|>")
    # Top-k of the response positions only (PadCollator places row j at label position prompt_length + j).
    assert example["response_top_k_ids"].shape == (len(example["input_ids"]) - prompt_length, samples.top_k_logprobs)
    # The teacher's top-1 at a greedy-generated position is the token it generated there.
    assert example["response_top_k_ids"][:, 0].tolist() == example["labels"][prompt_length:]


@pytest.mark.parametrize("method", ["sft", "kd"])
def test_training_lowers_the_loss_and_saves_a_loadable_student(sampled, method):
    store, dataset, samples = sampled
    config = TrainConfig(
        architecture=ARCHITECTURE,
        method=method,
        max_steps=40,
        batch_size=16,
        learning_rate=0.01,
        logging_steps=5,
        warmup_ratio=0.0,
    )
    student = train_student(config, dataset, samples, store)
    losses = [point["loss"] for point in student.loss_history]
    assert len(losses) == 8 and losses[-1] < losses[0] * 0.8
    model = AutoModelForCausalLM.from_pretrained(student.model_path)
    assert sum(p.numel() for p in model.parameters()) == student.parameters
    assert train_student(config, dataset, samples, store).cached


def test_evaluating_the_teacher_against_itself_gives_zero_kl_and_full_agreement(sampled, tiny_teacher):
    store, dataset, samples = sampled
    as_student = model_ref(tiny_teacher, "teacher-copy")
    report = evaluate_student(EvaluateConfig(max_new_tokens=8, max_prompts=15), dataset, samples, as_student, store)
    metrics = report.metrics
    assert metrics["kl_teacher_student"] < 1e-3  # float16 storage of the top-k is the only difference
    assert metrics["student_teacher_agreement"] == 1.0 and metrics["parameter_ratio"] == 1.0
    assert metrics["student_exact_match"] == metrics["teacher_exact_match"]
    assert metrics["student_perplexity"] == pytest.approx(metrics["teacher_perplexity"])
    assert {"student_exact_match/reverse", "teacher_exact_match/sort_letters"} <= set(metrics)


def test_evaluation_scores_exact_match_against_references(sampled):
    store, dataset, samples = sampled
    config = TrainConfig(architecture=ARCHITECTURE, method="sft", max_steps=2, batch_size=8)
    student = train_student(config, dataset, samples, store)
    report = evaluate_student(EvaluateConfig(max_new_tokens=8), dataset, samples, student, store)
    from stillhouse.evaluation.stage import read_generations

    table = read_generations(report)
    assert len(table) == dataset.eval_rows
    expected = (table["student_answer"].str.strip() == table["reference"].str.strip()).mean()
    assert report.metrics["student_exact_match"] == pytest.approx(expected)
    assert 0 < report.metrics["parameter_ratio"] < 1
