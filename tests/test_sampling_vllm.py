"""Engine `vllm` on a CUDA GPU: the same greedy answers and top-k log-probs as the `hf` engine (skipped without
CUDA)."""

import numpy as np
import pytest

from stillhouse.config import CurateConfig, SampleConfig
from stillhouse.data.curate import curate
from stillhouse.sampling.sample import sample_teacher
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.store import Store

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_vllm_engine_matches_the_hf_engine_under_greedy_decoding(tmp_path, tiny_teacher, prompts_jsonl):
    pytest.importorskip("vllm")
    dataset = curate(CurateConfig(source=str(prompts_jsonl)), Store(tmp_path / "curated"))
    settings = {
        "teacher": str(tiny_teacher),
        "max_new_tokens": 8,
        "top_k_logprobs": 4,
        "dtype": "float32",
        "shard_rows": 64,
    }
    hf = read_teacher_outputs(sample_teacher(SampleConfig(**settings), dataset, Store(tmp_path / "hf")).path)
    served = read_teacher_outputs(
        sample_teacher(
            SampleConfig(**settings, engine="vllm", gpu_memory_utilization=0.3), dataset, Store(tmp_path / "vllm")
        ).path
    )
    assert len(served) == len(hf) and list(served["prompt_id"]) == list(hf["prompt_id"])
    same = [list(a) == list(b) for a, b in zip(served["response_token_ids"], hf["response_token_ids"])]
    assert np.mean(same) > 0.9  # GPU kernels may flip a near-tie now and then
    for got, want, equal in zip(served.itertuples(), hf.itertuples(), same):
        if equal:
            np.testing.assert_allclose(
                np.stack(got.top_k_logprobs).astype(float), np.stack(want.top_k_logprobs).astype(float), atol=2e-2
            )
