"""Engine `vllm` on CUDA GPUs: the same greedy answers and top-k log-probs as the `hf` engine, and replicas on Ray
that write what one engine writes (skipped without CUDA, vLLM, or a second GPU for the replicas)."""

import numpy as np
import pytest
import torch

from stillhouse.config import CurateConfig, SampleConfig
from stillhouse.data.curate import curate
from stillhouse.sampling.sample import sample_teacher, unload_engines
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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_vllm_replicas_on_ray_write_what_one_engine_writes(tmp_path, tiny_teacher, prompts_jsonl):
    """Real vLLM in two Ray actors, each on a placement group of one GPU: the same shards as one engine here."""
    pytest.importorskip("vllm")
    ray = pytest.importorskip("ray")
    dataset = curate(CurateConfig(source=str(prompts_jsonl)), Store(tmp_path / "curated"))
    settings = {
        "teacher": str(tiny_teacher),
        "engine": "vllm",
        "max_new_tokens": 8,
        "top_k_logprobs": 4,
        "dtype": "float32",
        "shard_rows": 32,
        "gpu_memory_utilization": 0.3,
    }
    one = sample_teacher(SampleConfig(**settings), dataset, Store(tmp_path / "one"))
    unload_engines()
    try:
        two = sample_teacher(SampleConfig(**settings, vllm={"replicas": 2}), dataset, Store(tmp_path / "two"))
    finally:
        unload_engines()
        ray.shutdown()
    assert two.fingerprint == one.fingerprint
    single, replicated = read_teacher_outputs(one.path), read_teacher_outputs(two.path)
    assert list(replicated["prompt_id"]) == list(single["prompt_id"])
    same = [list(a) == list(b) for a, b in zip(replicated["response_token_ids"], single["response_token_ids"])]
    assert np.mean(same) > 0.9  # the same GPU model on both; a near-tie may still flip now and then
