"""Publishing: the folder is what the Hub gets; pushing needs a token and never leaks it."""

import pytest
from huggingface_hub import ModelCard

from registry.publish import push_folder
from stillhouse.config import parse_config
from stillhouse.errors import InputError


def test_push_without_a_token_names_the_variable(tmp_path, pipeline_raw, monkeypatch):
    monkeypatch.delenv("MY_HUB_TOKEN", raising=False)
    pipeline_raw["publish"] = {"repo_id": "alice/x", "token_env": "MY_HUB_TOKEN", "endpoint": "http://127.0.0.1:9"}
    with pytest.raises(InputError, match=r"\$MY_HUB_TOKEN is empty"):
        push_folder(tmp_path, parse_config(pipeline_raw))


def test_a_bad_token_is_refused_by_the_hub_and_creates_nothing(tmp_path, pipeline_raw, hub, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    (tmp_path / "README.md").write_text(ModelCard("---\nlicense: mit\n---\n# x\n").content)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    pipeline_raw["publish"] = {"repo_id": "alice/x", "endpoint": hub.url}
    with pytest.raises(HfHubHTTPError):
        push_folder(tmp_path, parse_config(pipeline_raw))
    assert not hub.repos


def test_model_card_names_every_source_of_a_mixture(pipeline_raw, prompts_jsonl):
    from registry.publish import model_card
    from stillhouse.refs import EvalReport, ModelRef, SamplesRef

    pipeline_raw["curate"] = {"sources": [{"source": str(prompts_jsonl), "weight": 2}, {"source": "HuggingFaceH4/ultrachat_200k", "prompt_column": "messages"}]}
    config = parse_config(pipeline_raw)
    samples = SamplesRef(stage="sample", fingerprint="s", path="/x", cached=True, rows=1, teacher="t", teacher_revision="local-sha256:abc",
                         tokenizer_fingerprint="f", top_k_logprobs=4, generated_tokens=1)
    student = ModelRef(stage="train", fingerprint="m", path="/x", cached=True, model_path="/x", parameters=10, train_seconds=1.0, final_loss=None)
    report = EvalReport(stage="evaluate", fingerprint="e", path="/x", cached=True,
                        metrics={"student_exact_match": 0.5, "teacher_exact_match": 0.9, "parameter_ratio": 0.25})
    card = model_card(config, samples, student, report)
    assert card.data.datasets == ["HuggingFaceH4/ultrachat_200k"]  # the local file is not a Hub dataset
    assert str(prompts_jsonl) in card.text and "| exact_match | 0.9 | 0.5 |" in card.text
