"""The sleep on Ray: per-user consolidations as Ray tasks, the shared one through Ray Train.

- `consolidate_users` fans each user's night out as a Ray task (`consolidate_user`, a plain
  function that tests call without Ray), on a CPU or a share of a GPU, and hands every finished
  user to a callback as soon as it is done, so a retried night redoes only the users whose delta
  was not yet saved.
- `train_shared` runs the shared distillation as a `TorchTrainer`: `ScalingConfig(num_workers=N,
  use_gpu=...)` makes the same loop run on CPU workers or on 1..N GPUs (DDP when N > 1), and
  `RunConfig(storage_path=...)` says where Ray Train keeps its run directory and checkpoints.

Users' weights and deltas travel through the object store as numpy arrays (`shipped`), which Ray
passes by reference to shared memory; the shared sleep's as CPU tensors. Fast states travel as
their safetensors bytes (`FastState.to_bytes`). No storage I/O happens here: the flow decides what
is saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.consolidation import (Replay, SleepConfig, add_delta, consolidate, cpu_weights, model_from,
                                 personal_delta)
from model.fast_state import FastState

log = logging.getLogger(__name__)
Weights = dict[str, torch.Tensor]


@dataclass
class UserNight:
    """Everything one user's sleep needs. Private: it never leaves this user's consolidation."""

    user_id: str
    texts: list[bytes]  # tonight's turns (prompt + response)
    earlier: list[bytes] = field(default_factory=list)  # this user's earlier turns, replayed so they stay learned
    state: bytes | None = None  # FastState.to_bytes of the user's fast memory, if any
    old_delta: Weights | None = None  # the user's dense personal delta on the previous weights


@dataclass
class UserResult:
    user_id: str
    tensors: Weights  # for DeltaStore.save_user_delta
    meta: dict[str, str]
    metrics: dict[str, float]
    trained: bool


def ensure_ray(address: str | None = None, num_cpus: int | None = 2) -> None:
    """Connect to `address` (a cluster) or start a small local Ray; no-op if already connected."""
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


# --- one user -----------------------------------------------------------------------------------

def consolidate_user(config_json: str, served: Weights, candidate: Weights, night: UserNight,
                     rehearsal: bytes, sleep_config: SleepConfig, candidate_version: str,
                     teacher_config_json: str | None = None, device: str = "cpu") -> UserResult:
    """One user's sleep into a personal delta on `candidate_version`, trained on `device`.

    Teacher: the weights that served the user today (`served` + their old delta) with their fast
    state, in `teacher_config_json`'s architecture (default: the candidate's). Student: starts from
    the candidate shared weights + their old delta (their knowledge so far, rebased), which is also
    the anchor. Replay: tonight's turns and, as their own stream, the user's earlier turns
    (Replay.earlier); rehearsal: base material only.

    When the candidate is a new architecture the old delta has the wrong shapes: the student starts
    from the candidate alone and learns the user's knowledge back from the teacher, replaying their
    earlier turns even on a night they said nothing.
    """
    config = ModelConfig.from_dict(json.loads(config_json))
    teacher_config = ModelConfig.from_dict(json.loads(teacher_config_json)) if teacher_config_json else config
    same_architecture = teacher_config == config
    old = night.old_delta or {}
    start = add_delta(candidate, old) if same_architecture else dict(candidate)
    texts, earlier = night.texts, night.earlier
    if not texts and not same_architecture:
        texts, earlier = night.earlier, []
    if not texts:  # nothing new tonight: carry the user's knowledge over to the new weights
        tensors, meta = personal_delta(candidate, start, candidate_version, kind="dense")
        return UserResult(night.user_id, tensors, meta, {}, trained=False)
    torch.manual_seed(sleep_config.seed)
    student = model_from(config, start)
    teacher = model_from(teacher_config, add_delta(served, old)) if sleep_config.distill else None
    state = FastState.from_bytes(night.state, teacher_config) if night.state else None
    metrics = consolidate(student, teacher, [Replay(texts, state, earlier)], rehearsal, sleep_config, device=device)
    tensors, meta = personal_delta(candidate, cpu_weights(student), candidate_version, sleep_config.personal_delta)
    return UserResult(night.user_id, tensors, {**meta, "night_texts": str(len(night.texts))}, metrics, trained=True)


# --- weights through Ray's object store -----------------------------------------------------------

Shipped = dict[str, "np.ndarray | torch.Tensor"]
_NUMPY_DTYPES = {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                 torch.uint8, torch.bool}


def shipped(weights: Weights) -> Shipped:
    """Weights as numpy arrays for Ray's object store, which passes arrays by reference to shared
    memory (pickle 5's out-of-band buffers) where it pickles a tensor's bytes into a copy: a task
    returning a `base` state dict (482 MB) took 1.3-2.3 s to reach the caller as tensors, 0.1 s as
    arrays (2-core CPU, Ray 2.55, session 17). A tensor of a dtype numpy lacks (bf16) stays one."""
    return {name: t.detach().cpu().numpy() if t.dtype in _NUMPY_DTYPES else t for name, t in weights.items()}


def received(weights: Shipped, writable: bool = False) -> Weights:
    """`shipped` weights as tensors. Arrays out of the object store are read-only views of shared
    memory: the tensors share it unless `writable`, which copies them (for callers that may
    change them in place); the night reads its weights and copies what it trains."""
    def tensor(array: np.ndarray) -> torch.Tensor:
        if writable:
            return torch.from_numpy(array.copy())
        with warnings.catch_warnings():  # torch warns of every read-only array; these are never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(array)
    return {name: tensor(a) if isinstance(a, np.ndarray) else a for name, a in weights.items()}


@ray.remote(num_cpus=1, max_retries=1)
def _consolidate_user_task(config_json: str, served: Shipped, candidate: Shipped, night: UserNight,
                           *args: object, on_gpu: bool) -> UserResult:
    """`consolidate_user` in a Ray task, on the GPU share Ray gave it or on its CPU; weights and
    deltas travel as `shipped` arrays both ways."""
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError(f"this user's night was given GPU {ray.get_gpu_ids()} by Ray, but torch on this "
                           f"worker sees no CUDA device (torch {torch.__version__}): install a CUDA build of "
                           "torch on the Ray workers, or set REVERIE_USER_NIGHT_GPUS=0 to sleep users on CPUs")
    night = dataclasses.replace(night, old_delta=received(night.old_delta) if night.old_delta else None)
    result = consolidate_user(config_json, received(served), received(candidate), night, *args,
                              device="cuda" if on_gpu else "cpu")
    return dataclasses.replace(result, tensors=shipped(result.tensors))


def _shipping(night: UserNight) -> UserNight:
    return dataclasses.replace(night, old_delta=shipped(night.old_delta)) if night.old_delta else night


def warn_without_gpus(share: float, setting: str) -> None:
    """Say why a night may wait: Ray holds a task that asks for GPUs until a node with one joins
    (an autoscaler adds them on demand; a cluster without one waits forever)."""
    available = ray.cluster_resources().get("GPU", 0.0)
    if share > 0 and available < share:
        log.warning("%s asks for %g GPU a task and the Ray cluster has %g now: the tasks wait for a GPU node "
                    "to join (its autoscaler's, if it has one); set %s=0 to run them on CPUs",
                    setting, share, available, setting)


def consolidate_users(config: ModelConfig, served: Weights, candidate: Weights, nights: Sequence[UserNight],
                      rehearsal: bytes, sleep_config: SleepConfig, candidate_version: str,
                      on_done: Callable[[UserResult], None], teacher_config: ModelConfig | None = None,
                      gpus_per_user: float = 0.0) -> list[UserResult]:
    """Fan the users out as Ray tasks; call `on_done` for each as soon as it finishes.
    `teacher_config`: the architecture of `served` when it is not `config` (a new student).
    `gpus_per_user`: each user's night takes this share of a GPU (0.25: four nights share one)
    and trains there; 0 trains on a CPU. A night's step is small (8 streams of 64 bytes by default),
    so one night alone leaves most of a GPU idle; `SleepConfig.cuda_graph` takes its host time off."""
    if not 0 <= gpus_per_user <= 1:
        raise ValueError(f"REVERIE_USER_NIGHT_GPUS must be a share of one GPU, 0 to 1 (0 = a CPU), "
                         f"got {gpus_per_user}; a user's night trains on one device")
    warn_without_gpus(gpus_per_user, "REVERIE_USER_NIGHT_GPUS")
    served_ref, candidate_ref, rehearsal_ref = ray.put(shipped(served)), ray.put(shipped(candidate)), ray.put(rehearsal)
    teacher_json = teacher_config.to_json() if teacher_config is not None else None
    task = _consolidate_user_task.options(num_gpus=gpus_per_user)
    pending = {task.remote(config.to_json(), served_ref, candidate_ref, _shipping(night), rehearsal_ref, sleep_config,
                           candidate_version, teacher_json, on_gpu=gpus_per_user > 0): night.user_id
               for night in nights}
    results = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        user_id = pending.pop(done[0])
        try:
            result: UserResult = ray.get(done[0])
        except ray.exceptions.RayError as error:  # Ray's message names the task, not the user
            error.add_note(f"in user {user_id!r}'s night; the users who finished before were handed to on_done")
            raise
        result = dataclasses.replace(result, tensors=received(result.tensors, writable=True))
        on_done(result)
        results.append(result)
    return results


# --- shared weights: Ray Train ------------------------------------------------------------------

def _shared_train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: shard the replays by rank, distill, rank 0 checkpoints."""
    import ray.train  # noqa: PLC0415 - only inside Train workers
    import ray.train.torch  # noqa: PLC0415

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config: ModelConfig = loop_config["model_config"]
    sleep_config: SleepConfig = loop_config["sleep_config"]
    start, teacher_weights = ray.get(loop_config["start"]), ray.get(loop_config["teacher"])
    texts: list[bytes] = ray.get(loop_config["texts"])
    earlier: list[bytes] = ray.get(loop_config["earlier"])
    torch.manual_seed(sleep_config.seed)
    model = model_from(config, start)
    # static_graph, not find_unused_parameters: forward leaves the memories' parameters unused (learn=False),
    # and the graph is the same every step, which is what static_graph needs (the anchor's pull is added to
    # the gradients after backward: model.consolidation.AnchorPull).
    student = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"static_graph": True})
    teacher = model_from(loop_config["teacher_config"], teacher_weights) if sleep_config.distill else None
    shard = texts[rank::world] or texts
    # Privacy: shared material is read by the teacher WITHOUT any user's fast state, which also
    # holds that user's private turns; only the shareable bytes themselves reach shared weights.
    rank_config = dataclasses.replace(sleep_config, seed=sleep_config.seed + rank)
    step_ends: list[float] = []  # float(loss) in on_step waits for the step, so these are real step times
    metrics = consolidate(student, teacher, [Replay(shard, earlier=earlier)], ray.get(loop_config["rehearsal"]),
                          rank_config, device=ray.train.torch.get_device(),
                          on_step=lambda step, loss: step_ends.append(time.perf_counter()))
    timed = step_ends[len(step_ends) // 10:]  # the first tenth warms up (allocator, kernels, DDP buckets)
    if len(timed) > 1:
        metrics["steps_per_s"] = (len(timed) - 1) / (timed[-1] - timed[0])
    if rank == 0:
        with tempfile.TemporaryDirectory() as directory:
            save_file(cpu_weights(model), str(Path(directory) / "weights.safetensors"))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    else:
        ray.train.report(metrics)


def train_shared(config: ModelConfig, start: Weights, teacher: Weights, texts: list[bytes], earlier: list[bytes],
                 rehearsal: bytes, sleep_config: SleepConfig, storage_path: str, run_name: str, num_workers: int = 1,
                 use_gpu: bool = False, teacher_config: ModelConfig | None = None) -> tuple[Weights, dict[str, float]]:
    """Distill tonight's shareable `texts` into shared weights with Ray Train, replaying earlier
    shareable turns (`earlier`, every worker all of them) as the personal sleeps do; returns
    (weights, metrics). `teacher_config`: the teacher's architecture when it is not `config`."""
    from ray.train import RunConfig, ScalingConfig  # noqa: PLC0415 - Ray Train loads slowly
    from ray.train.torch import TorchTrainer  # noqa: PLC0415

    warn_without_gpus(1.0 if use_gpu else 0.0, "REVERIE_SLEEP_GPU")
    if "://" not in storage_path:  # a local path; s3:// and other URIs are Ray Train's to create
        Path(storage_path).mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _shared_train_loop,
        train_loop_config={"model_config": config, "teacher_config": teacher_config or config,
                           "sleep_config": sleep_config, "start": ray.put(start),
                           "teacher": ray.put(teacher), "texts": ray.put(texts), "earlier": ray.put(earlier),
                           "rehearsal": ray.put(rehearsal)},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=run_name, storage_path=storage_path),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"shared sleep {run_name} finished without a checkpoint; see {storage_path}/{run_name}")
    with result.checkpoint.as_directory() as directory:
        weights = load_file(str(Path(directory) / "weights.safetensors"))
    return weights, {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
