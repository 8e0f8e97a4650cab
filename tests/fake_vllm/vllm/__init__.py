"""A stand-in for the `vllm` package on machines without a GPU (tests/test_vllm_replicas.py puts it on the path).

This is NOT vLLM: it loads no model and runs no kernel. It does what the replica tests check around vLLM:

- ``LLM(**options)`` records the options it was built with;
- like vLLM's Ray executor, with ``distributed_executor_backend="ray"`` it takes the placement group it
  runs in (``ray.util.get_current_placement_group()``) and starts one worker actor per bundle
  (``num_gpus=1``, on that bundle), and records the GPU ids Ray gave those workers; otherwise it records
  the GPU ids Ray gave its own process;
- ``LLM.generate`` answers each prompt with tokens derived by a hash from (prompt ids, the request's
  seed, the sample index), so the answer does not depend on which replica gives it, with top-k
  log-probs in vLLM's shape (``{token_id: Logprob(logprob, rank)}`` per position). It sleeps a moment per
  call, as a real engine would be busy, so that concurrent calls overlap.

Every event is appended as one JSON line to ``$FAKE_VLLM_LOG/<pid>.jsonl`` (nothing is written without it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

CALL_SECONDS = 0.3


def _log(event: dict) -> None:
    folder = os.environ.get("FAKE_VLLM_LOG")
    if folder:
        with open(os.path.join(folder, f"{os.getpid()}.jsonl"), "a") as log:
            log.write(json.dumps({"pid": os.getpid(), **event}) + "\n")


def TokensPrompt(prompt_token_ids: list[int]) -> dict:  # vLLM's is a TypedDict: calling it builds a dict
    return {"prompt_token_ids": list(prompt_token_ids)}


class SamplingParams:
    def __init__(self, **settings):
        self.settings = settings
        for name, value in settings.items():
            setattr(self, name, value)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class _GPUWorker:
    """What one vLLM worker holds: a GPU of the placement group."""

    def gpu_ids(self) -> list[str]:
        import ray

        return [str(gpu) for gpu in ray.get_gpu_ids()]


class LLM:
    def __init__(self, **options):
        self.options = options
        self.workers = []
        placement = None
        import ray

        if options.get("distributed_executor_backend") == "ray":
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            group = ray.util.get_current_placement_group()
            if group is None:
                raise RuntimeError("fake vllm: the ray backend runs in a placement group; there is none")
            placement = group.id.hex()
            world = options.get("tensor_parallel_size", 1) * options.get("pipeline_parallel_size", 1)
            worker = ray.remote(num_cpus=0, num_gpus=1)(_GPUWorker)
            self.workers = [
                worker.options(
                    scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)
                ).remote()
                for bundle in range(world)
            ]
            gpu_ids = [gpu for ids in ray.get([w.gpu_ids.remote() for w in self.workers]) for gpu in ids]
        elif ray.is_initialized():
            group = ray.util.get_current_placement_group()
            placement = group.id.hex() if group is not None else None
            gpu_ids = [str(gpu) for gpu in ray.get_gpu_ids()]
        else:
            gpu_ids = []
        _log({"event": "load", "options": options, "gpu_ids": gpu_ids, "placement_group": placement})

    def generate(self, prompts: list[dict], params: SamplingParams, use_tqdm: bool = False) -> list[RequestOutput]:
        time.sleep(CALL_SECONDS)
        outputs = []
        for prompt in prompts:
            ids = prompt["prompt_token_ids"]
            output = RequestOutput(ids)
            for index in range(params.n):
                digest = hashlib.sha256(json.dumps([ids, params.seed, index]).encode()).digest()
                tokens = [4 + byte % 40 for byte in digest[1 : 2 + digest[0] % params.max_tokens]]
                completion = CompletionOutput(index, "".join(chr(ord("a") + t % 26) for t in tokens), tokens)
                if params.logprobs:
                    completion.logprobs = [
                        {
                            4 + (token + rank) % 40: Logprob(math.log(0.5) * (rank + 1), rank + 1)
                            for rank in range(params.logprobs)
                        }
                        for token in tokens
                    ]
                output.outputs.append(completion)
            outputs.append(output)
        _log({"event": "generate", "seed": params.seed, "prompts": len(prompts)})
        return outputs
