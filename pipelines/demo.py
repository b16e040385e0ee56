"""`reverie demo`: one day and one night of Reverie on this machine, measured end to end.

    pretrain (once, kept) -> serve (Ray Serve on a local Ray) -> a day: simulated users teach
    facts over HTTP (fast memory learns, every turn goes to the Parquet log) -> sleep (the Prefect
    flow `consolidate`, ephemeral API) -> promotion; the replicas hot-swap (seen in the replies'
    model_version) -> a federated round (Flower's simulation) -> report (table, JSON, PNG)

Recall is what the sleep's gate measures (`model.evaluation.recalled`): exact greedy completion of
a fact's cue from an empty fast state, i.e. fast memory wiped. Before the sleep it is asked of the
weights that served the day; after it, of the promoted weights plus the user's personal delta, and
of the promoted shared weights alone (what every other user gets: it must stay 0).

Every run starts from a fresh store, `<data root>/demo/store/`; the pretrained checkpoint is kept
in `<data root>/demo/pretrained/` and reused; the report goes to `<data root>/demo/report.{json,png}`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from model.evaluation import Fact
from pipelines.paths import local_root
from pipelines.ports import check_port_free
from pipelines.settings import Settings

log = logging.getLogger(__name__)
APP_NAME = "reverie-demo"


@dataclass(frozen=True)
class DemoConfig:
    """One demo run. The sleep recipe is the one that recalls a night's facts on this pretraining
    budget while passing the default gate (held-out bits per byte within 10% for personal weights)."""

    preset: str = "tiny"  # model preset
    users: int = 3  # simulated users talking during the day
    facts_per_user: int = 2
    repeats: int = 2  # times each user tells each of their facts during the day
    reply_bytes: int = 8
    pretrain_steps: int = 150  # only when no pretrained checkpoint of this budget is kept yet
    pretrain_batch_size: int = 8
    pretrain_seq_len: int = 64
    sleep: dict[str, Any] = field(default_factory=lambda: {"steps": 120, "lr": 0.02, "rehearsal_weight": 0.3})
    clients: int = 2  # simulated devices in the federated round
    rounds: int = 1
    client_steps: int = 8  # local fine-tuning steps per device and round
    num_cpus: int = 2  # CPUs of the local Ray (Serve, the sleep, the federation)
    port: int = 8000
    seed: int = 0

    def __post_init__(self) -> None:
        small = [f"{name} must be >= 1, got {getattr(self, name)}" for name in
                 ("users", "facts_per_user", "repeats", "pretrain_steps", "clients", "rounds", "client_steps", "num_cpus")
                 if getattr(self, name) < 1]
        if small:
            raise ValueError("invalid demo settings: " + "; ".join(small))


DEMO_PRESETS: dict[str, DemoConfig] = {
    "tiny": DemoConfig(),
    "small": DemoConfig(preset="small", users=6, facts_per_user=3, pretrain_steps=1000, pretrain_batch_size=16,
                        pretrain_seq_len=256, sleep={"steps": 200, "lr": 0.01, "rehearsal_weight": 0.3},
                        clients=4, rounds=2, client_steps=20, num_cpus=8),
}

USER_NAMES = ("ada", "ben", "cleo", "dev", "eli", "fay", "gus", "hana", "ivo", "jun")


@contextlib.contextmanager
def phase(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Log the phase and record its wall time in seconds."""
    log.info("── %s", name)
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - started, 1)
        log.info("── %s done in %.1f s", name, timings[name])


# --- the material -------------------------------------------------------------------------------

def make_facts(users: int, per_user: int, seed: int) -> dict[str, list[Fact]]:
    """`per_user` facts per user, "The secret word of Kalo is renta.", every name and word unique."""
    rng = random.Random(seed)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    used: set[str] = set()

    def fresh(pattern: str) -> str:
        while True:
            text = "".join(rng.choice(consonants if c == "c" else vowels) for c in pattern)
            if text not in used:
                used.add(text)
                return text

    names = [USER_NAMES[i % len(USER_NAMES)] + (str(i // len(USER_NAMES)) if i >= len(USER_NAMES) else "")
             for i in range(users)]
    return {user: [Fact(f"The secret word of {fresh('cvcv').title()} is ".encode(), f"{fresh('cvccv')}.".encode())
                   for _ in range(per_user)]
            for user in names}


def pretrained_checkpoint(settings: Settings, config: DemoConfig, root: Path) -> tuple[Path, dict[str, Any]]:
    """The kept checkpoint for this preset and budget, trained now (`reverie train`'s code) if absent."""
    from pipelines.commands.train import train_checkpoint  # noqa: PLC0415

    path = root / "pretrained" / f"{config.preset}-{config.pretrain_steps}.safetensors"
    if path.exists():
        log.info("using the pretrained checkpoint %s", path)
        return path, json.loads(path.with_suffix(".json").read_text())
    overrides = {"steps": config.pretrain_steps, "batch_size": config.pretrain_batch_size,
                 "seq_len": config.pretrain_seq_len, "warmup": max(1, config.pretrain_steps // 10), "eval_batches": 2}
    return train_checkpoint(settings, config.preset, path, overrides, seed=config.seed, progress=sys.stderr.isatty())


def register(store_uri: str, checkpoint: Path, info: dict[str, Any]) -> str:
    """The checkpoint as the store's first version, promoted: what serving starts on."""
    from model.checkpoint import load_checkpoint, weights  # noqa: PLC0415
    from storage.checkpoints import CheckpointRegistry  # noqa: PLC0415

    model, _ = load_checkpoint(checkpoint)
    registry = CheckpointRegistry(store_uri)
    version = registry.save(weights(model), {"model_config": model.config.to_dict(), "preset": info.get("preset"),
                                             "source": str(checkpoint), "heldout_bpb": info.get("heldout_bpb")},
                            parent=None)
    registry.promote(version, expected_current=None)
    return version


# --- by day -------------------------------------------------------------------------------------

def start_serving(store_uri: str, config: DemoConfig) -> str:
    """A local Ray and the Serve app on the store; returns its URL."""
    import ray  # noqa: PLC0415
    from ray import serve  # noqa: PLC0415

    from workers.serving import build_app  # noqa: PLC0415

    # The replicas hold 0.75 of a CPU but idle at night: one more logical CPU lets the sleep's
    # per-user tasks use every core.
    ray.init(address="local", num_cpus=config.num_cpus + 1, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": config.port})
    serve.run(build_app({"data_root": store_uri, "preset": config.preset, "num_replicas": 1, "poll_interval_s": 0.5}),
              name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{config.port}"


def stop_serving() -> None:
    import ray  # noqa: PLC0415
    from ray import serve  # noqa: PLC0415

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def _generate(session: requests.Session, url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = session.post(f"{url}/v1/generate", json=body, timeout=300)
    if response.status_code != 200:
        raise RuntimeError(f"POST /v1/generate for {body['user_id']} answered {response.status_code}: "
                           f"{response.text[:300]}")
    return response.json()


def talk_for_a_day(url: str, facts: dict[str, list[Fact]], config: DemoConfig) -> dict[str, Any]:
    """Every user tells each of their facts `repeats` times (learn=True), users side by side."""
    latencies: list[float] = []
    versions: set[str] = set()
    lock = threading.Lock()

    def user_day(user: str) -> int:
        session = requests.Session()
        for repeat in range(config.repeats):
            for fact in facts[user]:
                started = time.perf_counter()
                reply = _generate(session, url, {"user_id": user, "prompt": fact.text().decode(),
                                                 "max_new_bytes": config.reply_bytes, "temperature": 0.8,
                                                 "learn": True})
                with lock:
                    latencies.append((time.perf_counter() - started) * 1000)
                    versions.add(reply["model_version"])
            log.info("%s told their %d facts (%d/%d)", user, len(facts[user]), repeat + 1, config.repeats)
        return len(facts[user]) * config.repeats

    night = datetime.now(UTC).date().isoformat()
    with ThreadPoolExecutor(len(facts)) as pool:
        turns = sum(pool.map(user_day, facts))
    if datetime.now(UTC).date().isoformat() != night:
        log.warning("the day crossed midnight UTC; the sleep consolidates %s only", night)
    return {"night": night, "turns": turns, "p50_ms": round(statistics.median(latencies), 1),
            "versions": sorted(versions)}


def wait_for_version(url: str, version: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Ask as a user with no memory and no delta until a reply comes from `version` (the hot-swap)."""
    session = requests.Session()
    deadline = time.monotonic() + timeout_s
    while True:
        reply = _generate(session, url, {"user_id": "visitor", "prompt": "The secret word of ",
                                         "max_new_bytes": 6, "temperature": 0.0, "learn": False})
        if reply["model_version"] == version or time.monotonic() > deadline:
            return reply
        time.sleep(0.5)


# --- by night -----------------------------------------------------------------------------------

def sleep(store_uri: str, night: str, config: DemoConfig) -> dict[str, Any]:
    """The nightly flow on the running local Ray; {"promoted": False, "failures": [...]} if its gate fails."""
    from pipelines.consolidate import GateFailed, consolidate  # noqa: PLC0415 - Prefect loads slowly

    try:
        # The default recipe whatever REVERIE_SLEEP_RECIPE says: reverie_fast's lr is too small for a model
        # pretrained minutes ago to learn a night's facts.
        return consolidate(night=night, data=store_uri, preset_name=config.preset, num_workers=1, use_gpu=False,
                           sleep_config=config.sleep, recipe="reverie")
    except GateFailed as error:
        log.error("%s", error)
        return {"night": night, "status": "gate failed", "promoted": False, "failures": [str(error)]}


def recall(store_uri: str, before: str, after: str | None, facts: dict[str, list[Fact]]) -> dict[str, Any]:
    """Per user: recall with fast memory wiped before the sleep, after it with the user's delta, and
    after it on the shared weights alone."""
    from model.config import ModelConfig  # noqa: PLC0415
    from model.consolidation import add_delta, dense_delta, model_from  # noqa: PLC0415
    from model.evaluation import recalled  # noqa: PLC0415
    from storage.checkpoints import CheckpointRegistry  # noqa: PLC0415
    from storage.deltas import DeltaStore  # noqa: PLC0415

    registry, deltas = CheckpointRegistry(store_uri), DeltaStore(store_uri)

    def load(version: str):
        weights, manifest = registry.load(version)
        return weights, ModelConfig.from_dict(manifest["model_config"])

    def rate(hits: list[bool]) -> float:
        return sum(hits) / len(hits)

    weights, model_config = load(before)
    served = model_from(model_config, weights)
    rows = {user: {"before_sleep": rate(recalled(served, user_facts))} for user, user_facts in facts.items()}
    if after is not None:
        shared_weights, model_config = load(after)
        shared = model_from(model_config, shared_weights)
        for user, user_facts in facts.items():
            found = deltas.load_user_delta(user, after)
            personal = model_from(model_config, add_delta(shared_weights, dense_delta(*found))) if found else shared
            rows[user]["after_sleep"] = rate(recalled(personal, user_facts))
            rows[user]["shared_after_sleep"] = rate(recalled(shared, user_facts))
    means = {key: round(statistics.mean(r[key] for r in rows.values()), 4) for key in next(iter(rows.values()))}
    return {**means, "per_user": rows}


def federated_round(store_uri: str, config: DemoConfig) -> dict[str, Any]:
    """`rounds` rounds of Flower's simulation on `clients` devices from the promoted weights; the
    aggregate is stored for the next sleep. Needs this process's Ray shut down (Flower starts its own)."""
    from federation.simulation import simulate  # noqa: PLC0415
    from storage.deltas import DeltaStore  # noqa: PLC0415

    summary = simulate(config.clients, {"num-server-rounds": config.rounds, "store": store_uri,
                                        "local-steps": config.client_steps, "distill-steps": 2,
                                        "client-bytes": 3000, "seed": config.seed}, num_cpus=config.num_cpus)
    uploads = [r["train"]["upload-bytes"] for r in summary["rounds"] if "upload-bytes" in r["train"]]
    dense_fp16 = None
    if summary.get("aggregate"):
        tensors, _ = DeltaStore(store_uri).load_aggregate(summary["aggregate"]["name"], summary["base_version"])
        dense_fp16 = sum(t.numel() for t in tensors.values()) * 2
    return {"clients": config.clients, "rounds": config.rounds, "base_version": summary["base_version"],
            "accepted": [len(r["accepted"]) for r in summary["rounds"]],
            "upload_bytes_per_client": round(statistics.mean(uploads)) if uploads else None,
            "dense_fp16_bytes": dense_fp16,
            "device_heldout_bpb_before": summary["initial_heldout_bpb"],
            "device_heldout_bpb_after": summary["final_heldout_bpb"],
            "aggregate": (summary.get("aggregate") or {}).get("name")}


# --- the whole run ------------------------------------------------------------------------------

def run_demo(config: DemoConfig, settings: Settings) -> dict[str, Any]:
    """Run every phase; returns the report (also written to <data root>/demo/report.{json,png})."""
    from pipelines.demo_report import write_report  # noqa: PLC0415

    check_port_free("127.0.0.1", config.port)
    root = local_root(settings) / "demo"
    store = root / "store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    store_uri = store.as_uri()
    timings: dict[str, float] = {}
    facts = make_facts(config.users, config.facts_per_user, config.seed)
    with phase("pretrain", timings):
        checkpoint, info = pretrained_checkpoint(settings, config, root)
        initial = register(store_uri, checkpoint, info)
    try:
        with phase("serve", timings):
            url = start_serving(store_uri, config)
            log.info("serving %s at %s", initial, url)
        with phase("day", timings):
            day = talk_for_a_day(url, facts, config)
        with phase("sleep", timings):
            night = sleep(store_uri, day["night"], config)
        promoted = night["version"] if night.get("promoted") else None
        swap: dict[str, Any] = {}
        if promoted:
            with phase("hot-swap", timings):
                swap = wait_for_version(url, promoted)
    finally:
        stop_serving()
    with phase("recall", timings):
        recalls = recall(store_uri, initial, promoted, facts)
    fed: dict[str, Any] = {}
    if promoted:
        with phase("federation", timings):
            fed = federated_round(store_uri, config)
    metrics = night.get("metrics", {})
    report = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "ray_num_cpus": config.num_cpus, "python": sys.version.split()[0]},
        "config": dataclasses.asdict(config),
        "store": store_uri,
        "pretrained": {"checkpoint": str(checkpoint), "steps": info.get("steps"), "heldout_bpb": info.get("heldout_bpb")},
        "versions": {"initial": initial, "promoted": promoted, "served_by_day": day["versions"],
                     "served_after_sleep": swap.get("model_version")},
        "day": {"night": day["night"], "users": len(facts), "turns": day["turns"], "p50_ms": day["p50_ms"]},
        "gate": {"passed": bool(promoted), "failures": night.get("failures", metrics.get("failures", []))},
        "recall": recalls,
        "bpb": {key: metrics.get(key) for key in ("base_bpb", "shared_bpb", "bpb_rise", "personal_bpb_rise")},
        "federation": fed,
        "timings_s": {**timings, "total": round(sum(timings.values()), 1)},
    }
    report["files"] = write_report(report, root)
    return report
