"""Each evaluation metric against a value computed by hand on a tiny case."""

import math
from types import SimpleNamespace

import pytest
import torch

from stillhouse.evaluation import metrics as m
from stillhouse.evaluation.evaluate import reference_examples, score_responses


def test_exact_match_ignores_surrounding_whitespace_only():
    assert m.exact_match([" cba\n", "abc", "ABC"], ["cba", "abd", "abc"]) == [True, False, False]


def test_longest_common_subsequence():
    assert m.lcs_length("ABCBDAB", "BDCABA") == 4  # BCBA
    assert m.lcs_length([], ["a"]) == 0


def test_rouge_l_f1_by_hand():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5: P = 5/6, R = 5/5, F1 = 2PR/(P+R) = 10/11.
    assert m.rouge_l("the cat sat on the mat", "The cat on the mat") == pytest.approx(10 / 11)
    assert m.rouge_l("a b", "c d") == 0.0
    assert m.rouge_l("", "") == 1.0 and m.rouge_l("", "x") == 0.0
    assert m.mean_rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)


def test_perplexity_speed_ratio_and_size():
    assert m.perplexity(math.log(4)) == pytest.approx(4.0)
    assert m.tokens_per_second(30, 2.0) == 15.0
    assert m.ratio(1.0, 4.0) == 0.25 and m.ratio(1.0, 0.0) is None and m.ratio(None, 1.0) is None


def test_size_on_disk_counts_weight_files_only(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1_500_000)
    (tmp_path / "config.json").write_text("{}" * 1000)
    assert m.size_on_disk_mb(str(tmp_path), parameter_bytes=0) == pytest.approx(1.5)
    assert m.size_on_disk_mb("org/hub-model", parameter_bytes=2_000_000) == pytest.approx(2.0)


class FixedDistribution(torch.nn.Module):
    """A 'model' whose next-token distribution is q = [0.5, 0.25, 0.25] at every position."""

    device = torch.device("cpu")

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.log(torch.tensor([0.5, 0.25, 0.25])).expand(*input_ids.shape, 3))


def test_perplexity_kl_top1_and_kl_by_position_by_hand():
    log = math.log
    # One example: a 1-token prompt, then two response tokens (both id 1). Top-k targets sit at label positions.
    # Position 0: teacher p = [0.25, 0.5, 0.25] (top-1 is id 1, the student's is id 0):
    # KL(p||q) = 0.25 ln(0.5) + 0.5 ln 2 = 0.25 ln 2.
    # Position 1: teacher p = q: KL 0, and the top-1 ids agree.
    example = {
        "input_ids": [0, 1, 1],
        "labels": [-100, 1, 1],
        # One row per response position, as build_examples makes them (PadCollator puts row j at prompt + j).
        "prompt_length": 1,
        "response_top_k_ids": torch.tensor([[1, 0, 2], [0, 1, 2]], dtype=torch.int32),
        "response_top_k_logprobs": torch.tensor([[log(0.5), log(0.25), log(0.25)]] * 2),
    }
    scores = score_responses(FixedDistribution(), [example], pad_token_id=0, batch_size=4, vocab_size=3)
    assert math.exp(scores["cross_entropy"]) == pytest.approx(4.0)  # -ln q(1) = ln 4 at both positions
    assert scores["kl"] == pytest.approx(0.25 * log(2) / 2, abs=1e-6)
    assert scores["kl_by_position"] == pytest.approx([0.25 * log(2), 0.0], abs=1e-6)
    assert scores["top1_agreement"] == pytest.approx(0.5)


def test_reference_examples_mask_the_prompt_and_end_with_eos(tiny_teacher):
    from stillhouse.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_teacher))
    [example] = reference_examples(tokenizer, [[{"role": "user", "content": "reverse: ab"}]], ["ba"])
    answer = tokenizer("ba", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example["labels"][-len(answer) :] == answer == example["input_ids"][-len(answer) :]
    assert set(example["labels"][: -len(answer)]) == {-100}


def test_student_teacher_ratios_only_where_both_are_measured():
    metrics = {
        "student_parameters": 10,
        "teacher_parameters": 40,
        "student_size_mb": 1.0,
        "teacher_size_mb": 0.0,
        "student_tokens_per_second": 30.0,
    }
    assert m.student_teacher_ratios(metrics) == {"parameter_ratio": 0.25}  # size: teacher 0; speed: no teacher


def test_answer_metric_groups_by_hand():
    import pandas as pd

    from stillhouse.evaluation.evaluate import (
        EvalPrompts,
        answer_agreement_metrics,
        exact_match_metrics,
        rouge_l_reference_metrics,
        rouge_l_teacher_metrics,
    )

    # Three prompts; the second has no reference, so exact match and ROUGE-L vs references skip it.
    frame = pd.DataFrame(
        {
            "prompt_id": ["a", "b", "c"],
            "messages": ["[]"] * 3,
            "reference": ["x y", None, "z"],
            "category": ["one", "one", "two"],
        }
    )
    prompts = EvalPrompts(frame=frame, conversations=[[]] * 3, with_references=frame["reference"].notna())
    answers = {"teacher": ["x y", "q", "w"], "student": ["x y", "q", "z"]}
    assert prompts.references() == ["x y", None, "z"]
    assert answer_agreement_metrics(answers) == {"student_teacher_agreement": pytest.approx(2 / 3)}
    assert rouge_l_teacher_metrics(answers) == {"student_rouge_l_teacher": pytest.approx(2 / 3)}
    assert rouge_l_reference_metrics(answers, prompts) == {
        "teacher_rouge_l_reference": 0.5,
        "student_rouge_l_reference": 1.0,
    }
    metrics, correct = exact_match_metrics(answers, prompts)
    assert metrics == {
        "teacher_exact_match": 0.5,
        "teacher_exact_match/one": 1.0,
        "teacher_exact_match/two": 0.0,
        "student_exact_match": 1.0,
        "student_exact_match/one": 1.0,
        "student_exact_match/two": 1.0,
        "accuracy_ratio_to_teacher": 2.0,
    }
    assert correct["teacher"].to_dict() == {0: True, 2: False}  # indexed like the prompts that have a reference
