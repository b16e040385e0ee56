"""The nightly Prefect flow `consolidate`: the story of one night.

    snapshot fast states -> read the night's experience -> sleep on Ray (shared weights through
    Ray Train, then every user's personal delta as Ray tasks) -> evaluate (recall, forgetting,
    leakage) -> promote atomically (registry CAS; serving polls `current` and hot-swaps)
    -> soft-reset fast memory.

Idempotent by night: the candidate version records `night` in its manifest. A re-run finds it:
if it was promoted the run stops at once; if it was saved but not promoted (a crash, a failed
gate) the shared weights are reused and only users whose delta is missing are trained again.
Promotion is a compare-and-swap from the version the night started on, so it happens at most once.

`student="search"` (or `"search:<run_id>"`) makes it an architecture night: the candidate takes
the architecture of the search's best genome (`storage.search_results.load_best_genome`), starts
from a fresh initialisation and distills the served model on the rehearsal corpus and the night's
shareable turns (`model.consolidation.architecture_night`); every user's personal delta is learned
anew in that architecture from their teacher (old weights + old delta + fast state). The same gate
decides: a student that cannot match the old model is not promoted.

`reverie sleep` runs this flow in-process; with no PREFECT_API_URL set Prefect uses its ephemeral
mode (a temporary local API, nothing to start).
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any

import torch
from safetensors.torch import save as save_bytes
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from model.config import ModelConfig, config_of_manifest, preset
from model.consolidation import SleepConfig, add_delta, architecture_night, dense_delta, model_from, named_recipe
from model.corpus import embedded_corpus
from model.evaluation import (GateConfig, Fact, bpb, fact_from_text, gate_failures, leakage_rate, recall_rate, recalled,
                              relative_rise)
from model.fast_state import FastState
from model.lm import ReverieLM
from pipelines.settings import Settings
from storage.checkpoints import CheckpointRegistry
from storage.deltas import DeltaStore
from storage.errors import ConflictError
from storage.experience import ExperienceReader
from storage.fast_states import FastStateStore
from storage.search_results import load_best_genome
from storage.uri import Store, open_store
from workers.consolidation import UserNight, UserResult, consolidate_users, ensure_ray, train_shared

log = logging.getLogger(__name__)
REHEARSAL_BYTES = 200_000  # window of the base corpus used for rehearsal and held-out checks


class GateFailed(RuntimeError):
    """The night's evaluation failed; nothing was promoted. The message lists why."""


@dataclasses.dataclass
class Night:
    """What the night starts from."""

    night: str  # the night's id, "YYYY-MM-DD" (the UTC day whose experience it consolidates)
    base: str  # version current when the night began (served the day)
    config: ModelConfig  # the base version's architecture: the teacher's
    student_config: ModelConfig  # the candidate's architecture: `config` unless the night changes it
    candidate: str | None  # version already saved for this night (a re-run), if any
    promoted: bool  # this night's candidate is already current or an ancestor of it


def _store(data: str | None) -> Store:
    return open_store(data or None)


def _ancestors(registry: CheckpointRegistry, version: str | None) -> list[str]:
    chain = []
    while version is not None:
        chain.append(version)
        version = registry.manifest(version).get("parent")
    return chain


def student_run_id(student: str | None) -> str | None:
    """The search run named by the flow's `student` option: "search:<run_id>" gives the run id,
    "search" gives "" (the latest run), None or "" gives None (the night keeps the architecture)."""
    if not student:
        return None
    kind, separator, run_id = student.partition(":")
    if kind != "search" or (separator and not run_id):
        raise ValueError(f"student must be 'search' (the latest search's best genome) or 'search:<run_id>', "
                         f"got {student!r}")
    return run_id or ""


@task
def open_night(data: str | None, night: str, preset_name: str, seed: int = 0, student: str | None = None) -> Night:
    """The base version (bootstrapped from a seeded `preset_name` model on an empty store), whether
    this night already has a candidate or was already promoted, and the candidate's architecture."""
    store = _store(data)
    registry = CheckpointRegistry(store)
    base = registry.current()
    if base is None:
        torch.manual_seed(seed)
        config = preset(preset_name)
        model = ReverieLM(config)
        version = registry.save({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                                {"model_config": config.to_dict(), "origin": f"bootstrap {preset_name} seed {seed}"},
                                parent=None)
        try:
            registry.promote(version, expected_current=None)
        except ConflictError:
            pass  # another first run bootstrapped concurrently: use its version
        base = registry.current()
    lineage = _ancestors(registry, base)
    tonight = [v for v in registry.versions() if registry.manifest(v).get("night") == night]
    promoted = [v for v in tonight if v in lineage]
    candidate = promoted[0] if promoted else (tonight[-1] if tonight else None)
    if candidate and not promoted:
        base = registry.manifest(candidate)["parent"]  # resume the night on the base it began from
    config = config_of_manifest(registry.manifest(base), preset_name)
    run_id = student_run_id(student)
    if candidate:
        student_config = config_of_manifest(registry.manifest(candidate), preset_name)
    elif run_id is not None:
        student_config = load_best_genome(store, run_id or None)
    else:
        student_config = config
    return Night(night, base, config, student_config, candidate, bool(promoted))


@task
def snapshot_fast_states(data: str | None) -> dict[str, bytes]:
    """Every user's fast state now, as FastState safetensors bytes (serving keeps writing its own)."""
    states = FastStateStore(_store(data))
    snapshot = {}
    for user in states.users():
        loaded = states.load(user)
        if loaded is not None:
            snapshot[user] = save_bytes({k: v.contiguous() for k, v in loaded[0].items()})
    return snapshot


@task(retries=2, retry_delay_seconds=1)
def read_experience(data: str | None, night: str, max_earlier: int = 2000) -> dict[str, list[dict]]:
    """Tonight's turns, and a sample of earlier turns that the sleep replays so they stay learned."""
    reader = ExperienceReader(_store(data))
    day = date.fromisoformat(night)
    columns = ["user_id", "prompt", "response", "shareable"]
    tonight = reader.read(day, day).select(columns).to_pylist()
    earlier = reader.sample(max_earlier, seed=0, end=day - timedelta(days=1)).select(columns).to_pylist()
    return {"tonight": tonight, "earlier": earlier}


def _text(row: dict) -> bytes:
    return row["prompt"] + row["response"]


@task(retries=2, retry_delay_seconds=1)
def sleep_shared(data: str | None, night: Night, experience: dict[str, list[dict]], rehearsal: bytes,
                 sleep_config: SleepConfig, num_workers: int, use_gpu: bool, storage_path: str) -> str:
    """New shared weights = base + federated aggregates, distilled on shareable turns (Ray Train).
    Saved as the night's candidate version (not promoted); a re-run reuses it."""
    if night.candidate is not None:
        return night.candidate
    logger = get_run_logger()
    store = _store(data)
    registry = CheckpointRegistry(store)
    base_weights, _ = registry.load(night.base)
    start = base_weights
    aggregates = DeltaStore(store).load_aggregates(night.base)
    for aggregate in aggregates:
        start = add_delta(start, dense_delta(aggregate.tensors, aggregate.meta))
    shareable = [_text(r) for r in experience["tonight"] if r["shareable"]]
    earlier = [_text(r) for r in experience["earlier"] if r["shareable"]]
    metrics: dict[str, float] = {}
    manifest: dict[str, Any] = {"night": night.night, "model_config": night.student_config.to_dict(),
                                "shareable_turns": len(shareable), "aggregates": [a.name for a in aggregates]}
    if night.student_config != night.config:
        # A new architecture: a fresh student learns the served model (with tonight's aggregates).
        torch.manual_seed(sleep_config.seed)
        fresh = {k: v.detach().contiguous() for k, v in ReverieLM(night.student_config).state_dict().items()}
        texts = shareable or corpus_records(rehearsal)
        start, metrics = train_shared(night.student_config, fresh, start, texts, earlier, rehearsal,
                                      architecture_night(sleep_config), storage_path, f"sleep-{night.night}",
                                      num_workers, use_gpu, teacher_config=night.config)
        manifest["architecture_from"] = {"teacher_config": night.config.to_dict(),
                                         "steps": sleep_config.architecture_steps}
    elif shareable:
        start, metrics = train_shared(night.config, start, base_weights, shareable, earlier, rehearsal,
                                      sleep_config, storage_path, f"sleep-{night.night}", num_workers, use_gpu)
    logger.info("shared sleep: %d shareable turns, %d aggregates, metrics %s", len(shareable), len(aggregates), metrics)
    manifest["shared_metrics"] = metrics
    return registry.save({k: v.contiguous() for k, v in start.items()}, manifest, parent=night.base)


def corpus_records(data: bytes, size: int = 256) -> list[bytes]:
    """The rehearsal corpus cut into `size`-byte records: what an architecture night replays when
    nobody shared a turn (its student must learn from something besides the corpus stream)."""
    return [data[i:i + size] for i in range(0, len(data) - size + 1, size)] or [data]


def consolidate_users_step(data: str | None, night: Night, candidate: str, experience: dict[str, list[dict]],
                           fast_states: dict[str, bytes], rehearsal: bytes, sleep_config: SleepConfig,
                           gpus_per_user: float = 0.0) -> dict:
    """Every user's personal delta on `candidate`, skipping users whose delta is already saved;
    each user's night on `gpus_per_user` of a GPU, or on a CPU (0)."""
    store = _store(data)
    registry, deltas = CheckpointRegistry(store), DeltaStore(store)
    done = set(deltas.users(candidate))
    users = sorted(({r["user_id"] for r in experience["tonight"]} | set(deltas.users(night.base))) - done)
    nights = []
    for user in users:
        old = deltas.load_user_delta(user, night.base)
        nights.append(UserNight(
            user_id=user,
            texts=[_text(r) for r in experience["tonight"] if r["user_id"] == user],
            earlier=[_text(r) for r in experience["earlier"] if r["user_id"] == user],
            state=fast_states.get(user),
            old_delta=dense_delta(*old) if old else None))
    served, _ = registry.load(night.base)
    shared, _ = registry.load(candidate)

    def save(result: UserResult) -> None:
        deltas.save_user_delta(result.user_id, candidate, result.tensors,
                               {**result.meta, "night": night.night, "trained": str(result.trained)})

    results = consolidate_users(night.student_config, served, shared, nights, rehearsal, sleep_config, candidate,
                                save, teacher_config=night.config, gpus_per_user=gpus_per_user)
    return {"trained": sorted(r.user_id for r in results if r.trained),
            "carried": sorted(r.user_id for r in results if not r.trained), "skipped": sorted(done)}


sleep_users = task(retries=2, retry_delay_seconds=1, name="sleep_users")(consolidate_users_step)


@task
def evaluate_night(data: str | None, night: Night, candidate: str, experience: dict[str, list[dict]],
                   heldout: bytes, gate: GateConfig) -> dict[str, Any]:
    """Recall (user's delta on, fast memory wiped), forgetting (held-out bpb), leakage (other users)."""
    store = _store(data)
    registry, deltas = CheckpointRegistry(store), DeltaStore(store)
    served = model_from(night.config, registry.load(night.base)[0])
    shared_weights = registry.load(candidate)[0]
    shared = model_from(night.student_config, shared_weights)
    facts: dict[str, list[Fact]] = {}
    for row in experience["tonight"]:
        fact = fact_from_text(row["prompt"])
        if fact is not None and not row["shareable"]:
            facts.setdefault(row["user_id"], []).append(fact)
    personal = {u: model_from(night.student_config, add_delta(shared_weights, dense_delta(*deltas.load_user_delta(u, candidate))))
                for u in deltas.users(candidate)}
    base_bpb = bpb(served, heldout)
    metrics: dict[str, Any] = {"base_bpb": base_bpb, "shared_bpb": bpb(shared, heldout)}
    metrics["bpb_rise"] = relative_rise(base_bpb, metrics["shared_bpb"])
    metrics["personal_bpb_rise"] = max((relative_rise(base_bpb, bpb(m, heldout)) for m in personal.values()),
                                       default=float("nan"))
    earlier = b"\n".join(_text(r) for r in experience["earlier"] if r["shareable"])
    if len(earlier) > 1024:
        metrics["earlier_bpb_rise"] = relative_rise(bpb(served, earlier, max_batches=4), bpb(shared, earlier, max_batches=4))
    recalls, leaks = [], []
    users = sorted(facts)
    for i, user in enumerate(users):
        if user in personal:
            recalls.append(recall_rate(personal[user], facts[user]))
        known = recalled(served, facts[user])
        peers = [personal[u] for u in users[i + 1:] + users[:i] if u in personal][:gate.leakage_peers]
        leaks += [leakage_rate(foreign, facts[user], known) for foreign in [shared, *peers]]
    metrics["recall"] = sum(recalls) / len(recalls) if recalls else float("nan")
    metrics["leakage"] = max(leaks, default=0.0)
    metrics["users"] = len(personal)
    metrics["facts"] = sum(len(f) for f in facts.values())
    metrics["failures"] = gate_failures(metrics, gate)
    return metrics


@task(retries=3, retry_delay_seconds=1)
def promote(data: str | None, base: str, candidate: str) -> bool:
    """CAS `current` from the night's base to its candidate; True if this call moved it."""
    registry = CheckpointRegistry(_store(data))
    try:
        registry.promote(candidate, expected_current=base)
        return True
    except ConflictError:
        if registry.current() == candidate:  # an earlier attempt of this night promoted it
            return False
        raise


@task
def soft_reset_fast_states(data: str | None, candidate: str, keep: float, config: ModelConfig) -> int:
    """Decay every user's fast memory (what it held now lives in weights); once per version. A state
    of another architecture (an architecture night) cannot carry over: it starts empty in `config`."""
    states = FastStateStore(_store(data))
    count = 0
    for user in states.users():
        loaded = states.load(user)
        if loaded is None or loaded[1].get("base_version") == candidate:
            continue
        reset = FastState(**loaded[0]).after_promotion(config, keep)
        states.save(user, reset.tensors(), {**loaded[1], "base_version": candidate})
        count += 1
    return count


def _report(night: str, candidate: str | None, metrics: dict[str, Any], users: dict, promoted: bool) -> str:
    rows = [("night", night), ("candidate", candidate), ("promoted", promoted),
            ("users trained", len(users.get("trained", []))), ("users carried over", len(users.get("carried", [])))]
    rows += [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in metrics.items() if k != "failures"]
    rows.append(("gate", "; ".join(metrics.get("failures", [])) or "passed"))
    return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


@flow(name="consolidate")
def consolidate(night: str | None = None, data: str | None = None, preset_name: str = "tiny",
                ray_address: str | None = None, num_workers: int | None = None, use_gpu: bool | None = None,
                user_night_gpus: float | None = None, train_storage: str | None = None,
                sleep_config: dict[str, Any] | None = None, gate: dict[str, Any] | None = None,
                soft_reset_keep: float = 0.5, student: str | None = None, recipe: str | None = None) -> dict[str, Any]:
    """Consolidate the experience of UTC day `night` (default: yesterday) in the store at `data`.

    The night's recipe is `recipe` (a name in model.consolidation.METHODS; unset: REVERIE_SLEEP_RECIPE
    or reverie.toml's `sleep_recipe`, else "reverie") with the fields of `sleep_config` changed.

    `student`: None keeps the architecture; "search" or "search:<run_id>" distills into the best
    genome of that search run (see the module docstring).

    Where it runs is configuration: unset (or empty) `ray_address`, `num_workers`, `use_gpu`,
    `user_night_gpus` and `train_storage` come from `Settings` (RAY_ADDRESS, REVERIE_SLEEP_WORKERS,
    REVERIE_SLEEP_GPU, REVERIE_USER_NIGHT_GPUS, REVERIE_TRAIN_STORAGE or reverie.toml), so a Prefect
    worker's environment alone can point the night at a Ray cluster, and a Ray job's entrypoint
    joins the cluster that runs it.
    """
    logger = get_run_logger()
    settings = Settings.load()
    night = night or (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    recipe = recipe or settings.sleep_recipe
    sleep_cfg, gate_cfg = named_recipe(recipe, **(sleep_config or {})), GateConfig(**(gate or {}))
    logger.info("night %s: recipe %s%s", night, recipe, f" with {sleep_config}" if sleep_config else "")
    state = open_night(data, night, preset_name, student=student)
    if state.promoted:
        logger.info("night %s was already promoted as %s; nothing to do", night, state.candidate)
        return {"night": night, "status": "already promoted", "version": state.candidate, "promoted": False}
    fast_states = snapshot_fast_states(data)
    experience = read_experience(data, night)
    corpus = embedded_corpus()
    rehearsal, heldout = corpus.train[:REHEARSAL_BYTES], corpus.heldout[:REHEARSAL_BYTES // 4]
    ensure_ray(ray_address or settings.ray_address)
    storage_path = train_storage or settings.train_storage or _train_storage(data)
    candidate = sleep_shared(data, state, experience, rehearsal, sleep_cfg, num_workers or settings.sleep_workers,
                             settings.sleep_gpu if use_gpu is None else use_gpu, storage_path)
    users = sleep_users(data, state, candidate, experience, fast_states, rehearsal, sleep_cfg,
                        settings.user_night_gpus if user_night_gpus is None else user_night_gpus)
    metrics = evaluate_night(data, state, candidate, experience, heldout, gate_cfg)
    promoted = False
    if not metrics["failures"]:
        promoted = promote(data, state.base, candidate)
        soft_reset_fast_states(data, candidate, soft_reset_keep, state.student_config)
    create_markdown_artifact(_report(night, candidate, metrics, users, promoted), key=f"sleep-{night}",
                             description=f"Reverie sleep of {night}")
    if metrics["failures"]:
        raise GateFailed(f"night {night}: candidate {candidate} not promoted: " + "; ".join(metrics["failures"]))
    logger.info("night %s: %s is current (promoted by this run: %s)", night, candidate, promoted)
    return {"night": night, "status": "promoted", "version": candidate, "promoted": promoted, "recipe": recipe,
            "users": users, "metrics": metrics}


def _train_storage(data: str | None) -> str:
    """Ray Train's run directory: under a local data root, else a local temporary directory."""
    import tempfile  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    uri = _store(data).uri
    if uri.startswith("file://"):
        return str(Path(uri[len("file://"):]) / "ray_train")
    return str(Path(tempfile.gettempdir()) / "reverie-ray-train")
