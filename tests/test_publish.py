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
