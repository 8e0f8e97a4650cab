"""The `vllm` engine: vLLM on GPUs (``pip install stillhouse[vllm]``), with ``logprobs=k`` for top-k capture.

vLLM returns the log-probs of the model's raw distribution (its default ``logprobs_mode``), so
they are the teacher's temperature-1 log-probs whatever the sampling temperature; the tail mass is
what the k of them leave, 1 - Σ exp(top) (`engine.tail_logprob`). Prompts go in as token ids
(rendered and truncated by the caller, like the `hf` engine) and vLLM batches them itself.

A teacher too big for one GPU is split by vLLM itself (``sample.vllm.tensor_parallel_size`` x
``pipeline_parallel_size`` GPUs per engine). More throughput comes from data-parallel replicas:

    engine = VLLMEngine(path, ..., parallel=config.vllm)      # one engine in this process (replicas: 1)
    engine = VLLMReplicas(path, ..., parallel=config.vllm)    # replicas > 1, or a Ray cluster named

`VLLMReplicas` puts each replica in a Ray placement group of tensor x pipeline one-GPU bundles
(STRICT_PACK: one node, since tensor parallelism needs NVLink-class bandwidth) and starts the vLLM
engine inside a Ray actor placed in that group; vLLM finds the group it runs in and starts its own
per-GPU workers on the group's bundles (its documented recipe for vLLM inside Ray). Replicas never
share a GPU: each bundle reserves one.

The replicas' Ray workers import stillhouse and vLLM: install ``stillhouse[vllm]`` on the cluster's
nodes (the worker image).

Shards go to replicas through a work queue: a `generate` call takes whichever replica is free and
gives it back when done. Not shard i -> replica i % replicas, because a resumed run has an arbitrary
set of shards left (e.g. only even ones, all on replica 0) and shards differ in length; a queue keeps
every replica busy either way. Which replica answers does not change the answer: every replica
loads the same model with the same settings, and each request samples under the shard's own seed,
so a shard's content depends only on config, prompts and shard index.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from stillhouse import capabilities
from stillhouse.errors import InputError
from stillhouse.sampling.engine import Generation, Prompt, SamplingSettings, tail_logprob

if TYPE_CHECKING:
    from stillhouse.config import VLLMSettings

# How long the replicas' placement groups may wait for GPUs before sampling gives up (an autoscaling
# cluster may need minutes to add nodes; a cluster that is simply too small is refused before this).
PLACEMENT_TIMEOUT_S = 900.0


def vllm_available() -> bool:
    """True when vLLM is installed and a CUDA GPU is present: the only case engine `vllm` runs in this process."""
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def check_vllm() -> None:
    if not vllm_available():
        raise InputError(
            "sample.engine: `vllm` needs vLLM and a CUDA GPU; install it with `pip install stillhouse[vllm]` "
            "on a GPU machine, or use engine `hf`"
        )


def uses_ray(parallel: VLLMSettings) -> bool:
    """Replicas run as Ray actors when there are several, or when a Ray cluster is named; else one engine here."""
    return parallel.replicas > 1 or parallel.ray_address is not None


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError(
            "sample.vllm: replicas > 1 (or ray_address) run on Ray, which is not installed; "
            "pip install 'stillhouse[ray]', or set sample.vllm.replicas: 1"
        ) from None
    return ray


def connect_ray(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (null: the one this process already runs, or a new local one)."""
    ray = import_ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise InputError(
            f"sample.vllm.ray_address: no Ray cluster answers at {address!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''}); start one (`ray start --head` on its head "
            "node), fix the address, or set it to null for a local Ray"
        ) from None


def available_gpus(parallel: VLLMSettings) -> tuple[int, str]:
    """(GPUs the engine can be given, where they were counted), before anything loads.

    One engine here: this machine's CUDA devices. Replicas: the GPU resources of the Ray cluster (the
    one named in ``ray_address``, or the one this process is already connected to); a local Ray that
    is not started yet will see this machine's devices.
    """
    if uses_ray(parallel):
        ray = import_ray()
        if parallel.ray_address is not None or ray.is_initialized():
            connect_ray(parallel.ray_address)
            where = f"the Ray cluster at {parallel.ray_address}" if parallel.ray_address else "the running Ray cluster"
            return int(ray.cluster_resources().get("GPU", 0)), where
    return local_gpu_count(), "this machine (torch.cuda.device_count())"


def check_vllm_engine(parallel: VLLMSettings) -> None:
    """Refuse what can't run before anything loads: vLLM or a GPU missing here (one local engine), Ray missing
    (replicas), or more GPUs asked (tensor x pipeline x replicas) than there are.

    Replicas need neither vLLM nor a GPU in this process: their actors load vLLM on the cluster's GPUs.
    """
    if uses_ray(parallel):
        import_ray()
    else:
        check_vllm()
    gpus, where = available_gpus(parallel)
    problem = capabilities.vllm_gpu_problem(
        tensor_parallel_size=parallel.tensor_parallel_size,
        pipeline_parallel_size=parallel.pipeline_parallel_size,
        replicas=parallel.replicas,
        gpus_available=gpus,
        where=where,
    )
    if problem:
        raise InputError(problem)


class VLLMEngine:
    """A teacher loaded into vLLM, behind the engine protocol (`stillhouse.sampling.engine.Engine`).

    ``seed`` seeds the engine; each call's requests sample under the call's own seed. ``max_logprobs``
    is the largest ``top_k_logprobs`` a call may ask for (vLLM fixes it when it loads the model).
    ``parallel`` (``sample.vllm``) adds tensor and pipeline parallelism, ``max_model_len`` and prefix
    caching; ``distributed_executor_backend`` is set to ``ray`` by a replica whose vLLM workers are to
    run on its placement group. The checks (`check_vllm_engine`) run before, in `sample.check_teacher`.
    """

    def __init__(
        self,
        teacher_path: str,
        *,
        revision: str | None,
        dtype: str,
        seed: int,
        gpu_memory_utilization: float,
        max_logprobs: int,
        parallel: VLLMSettings | None = None,
        distributed_executor_backend: str | None = None,
    ):
        from vllm import LLM

        options = {
            "model": teacher_path,
            "revision": revision,
            "dtype": dtype,
            "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_logprobs": max_logprobs,
        }
        if parallel is not None:
            options.update(
                tensor_parallel_size=parallel.tensor_parallel_size,
                pipeline_parallel_size=parallel.pipeline_parallel_size,
                max_model_len=parallel.max_model_len,
                enable_prefix_caching=parallel.enable_prefix_caching,
            )
        if distributed_executor_backend is not None:
            options["distributed_executor_backend"] = distributed_executor_backend
        self.llm = LLM(**options)
        self.lock = threading.Lock()  # one call at a time: concurrent shards would only contend for the GPU

    def generate(
        self,
        prompts: Sequence[Prompt],
        settings: SamplingSettings,
        *,
        seed: int,
        where: str,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """``settings.n`` generations per prompt, prompt-major; every request samples under ``seed``."""
        from vllm import SamplingParams, TokensPrompt

        for prompt in prompts:
            if prompt.token_ids is None:
                raise ValueError(
                    f"{where}, prompt {prompt.prompt_id!r}: the vllm engine takes rendered token ids; it got none"
                )
        k = settings.top_k_logprobs
        params = SamplingParams(
            n=settings.n,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k or -1,
            max_tokens=settings.max_new_tokens,
            stop=list(settings.stop) or None,
            include_stop_str_in_output=True,
            seed=seed,
            logprobs=k or None,
        )
        with self.lock:
            token_prompts = [TokensPrompt(prompt_token_ids=list(prompt.token_ids)) for prompt in prompts]
            outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        generations = []
        for output in outputs:
            for sample_index, completion in enumerate(output.outputs):
                generation = Generation(list(completion.token_ids), completion.text, sample_index=sample_index)
                if k:
                    generation.top_k_ids, generation.top_k_logprobs, generation.tail_logprobs = [], [], []
                    for position in completion.logprobs:
                        # k entries by rank, plus the sampled token when it ranked lower: keep the k best.
                        top = sorted(position.items(), key=lambda item: item[1].rank)[:k]
                        generation.top_k_ids.append([token_id for token_id, _ in top])
                        generation.top_k_logprobs.append([entry.logprob for _, entry in top])
                        generation.tail_logprobs.append(tail_logprob(entry.logprob for _, entry in top))
                generations.append(generation)
        if on_progress is not None:
            on_progress(len(prompts))
        return generations

    def close(self) -> None:
        """Nothing to release: vLLM frees the GPU when the engine is garbage-collected."""


class _Replica:
    """One replica: a `VLLMEngine` inside a Ray actor placed in the replica's placement group.

    With tensor x pipeline > 1 this actor holds no GPU itself: vLLM's Ray executor finds the placement
    group the actor runs in and starts one worker per bundle (one GPU each). Ray hides every GPU from
    an actor that asked for none, so the actor unsets CUDA_VISIBLE_DEVICES first, as vLLM's own
    example of vLLM in a Ray actor does. With one GPU per replica the actor takes the bundle's GPU and
    vLLM runs in-process (its default for one GPU).
    """

    def __init__(self, teacher_path: str, options: dict, parallel: VLLMSettings):
        world = parallel.gpus_per_replica()
        if world > 1:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        self.engine = VLLMEngine(
            teacher_path, **options, parallel=parallel, distributed_executor_backend="ray" if world > 1 else None
        )

    def ready(self) -> bool:
        return True

    def generate(self, prompts: list[Prompt], settings: SamplingSettings, seed: int, where: str) -> list[Generation]:
        return self.engine.generate(prompts, settings, seed=seed, where=where)


class VLLMReplicas:
    """``parallel.replicas`` vLLM engines, each a Ray actor on a placement group of its own, behind the engine protocol.

    Each placement group holds tensor x pipeline bundles of one GPU, packed on one node (STRICT_PACK).
    The constructor waits until every replica has loaded the teacher, so a failure to load surfaces here;
    `generate` runs one call on whichever replica is free (a work queue; see the module docstring), and
    several calls at once (one per replica) keep them all busy. `close` kills the actors and frees the GPUs.
    """

    def __init__(
        self,
        teacher_path: str,
        *,
        revision: str | None,
        dtype: str,
        seed: int,
        gpu_memory_utilization: float,
        max_logprobs: int,
        parallel: VLLMSettings,
        placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
    ):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        connect_ray(parallel.ray_address)
        world = parallel.gpus_per_replica()
        self.groups, self.actors = [], []
        self.placements: list[dict] = []  # per replica: its placement group id and bundles (for logs and tests)
        try:
            self.groups = [
                placement_group([{"GPU": 1}] * world, strategy="STRICT_PACK") for _ in range(parallel.replicas)
            ]
            try:
                ray.get([group.ready() for group in self.groups], timeout=placement_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise InputError(
                    f"sample.vllm: {parallel.replicas} replicas of {world} GPUs each (tensor_parallel_size "
                    f"{parallel.tensor_parallel_size} x pipeline_parallel_size {parallel.pipeline_parallel_size}, "
                    f"on one node each) could not be placed within {placement_timeout_s:.0f}s; the cluster has "
                    f"{int(ray.cluster_resources().get('GPU', 0))} GPUs, "
                    f"{int(ray.available_resources().get('GPU', 0))} free (see `ray status`); "
                    "lower sample.vllm.replicas, or free or add GPUs"
                ) from None
            options = {
                "revision": revision,
                "dtype": dtype,
                "seed": seed,
                "gpu_memory_utilization": gpu_memory_utilization,
                "max_logprobs": max_logprobs,
            }
            replica = ray.remote(_Replica)
            for group in self.groups:
                strategy = PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
                )
                # One GPU: the actor uses its bundle's GPU. Several: vLLM's workers take the bundles, the actor none.
                self.actors.append(
                    replica.options(num_cpus=0, num_gpus=1 if world == 1 else 0, scheduling_strategy=strategy).remote(
                        teacher_path, options, parallel
                    )
                )
                self.placements.append({"placement_group": group.id.hex(), "bundles": group.bundle_specs})
            ray.get([actor.ready.remote() for actor in self.actors])
        except BaseException:
            self.close()
            raise
        self.free: queue.Queue[int] = queue.Queue()
        for index in range(len(self.actors)):
            self.free.put(index)

    def generate(
        self,
        prompts: Sequence[Prompt],
        settings: SamplingSettings,
        *,
        seed: int,
        where: str,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """The call on the next free replica (blocking while all are busy); answers as `VLLMEngine.generate`."""
        import ray

        index = self.free.get()
        try:
            generations = ray.get(self.actors[index].generate.remote(list(prompts), settings, seed, where))
        finally:
            self.free.put(index)
        if on_progress is not None:
            on_progress(len(prompts))
        return generations

    def close(self) -> None:
        """Kill the replicas and remove their placement groups, which gives their GPUs back to the cluster."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if ray.is_initialized():  # else Ray is gone, and the actors and groups with it
            for actor in self.actors:
                ray.kill(actor)
            for group in self.groups:
                remove_placement_group(group)
        self.actors, self.groups = [], []
