"""The Prefect flow `federate`: N rounds of federated personalization, and its result registered.

    start the Flower run (`flwr run`) -> wait for it to finish -> find its aggregate in the delta
    store -> publish the round-by-round report as an artifact and return it

The rounds themselves run in Flower (federation/: a ServerApp on the SuperLink, ClientApps on the
devices), which this flow drives through Flower's own command line, the supported way to submit a
run to a SuperLink: `connection` names a SuperLink connection of the Flower configuration
($FLWR_HOME/config.toml); the default, "local", is Flower's local simulation with `clients`
virtual devices. The ServerApp saves the run's aggregate in the delta store under the name this
flow chose, so the flow finds exactly its own result, and the next sleep (pipelines.consolidate)
folds it into the shared weights.

Safe to re-run: give the run a `name` and a re-run finds the aggregate already stored under it
and returns it without starting Flower again (the sleep adds every aggregate stored on its base, so
running the same rounds twice under two names would count them twice). A run that died before its
ServerApp saved anything left nothing behind, and the re-run starts it afresh.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from storage.deltas import DeltaStore
from storage.uri import open_store

APP_DIR = Path(__file__).resolve().parent.parent  # the project root: pyproject.toml with [tool.flwr.app]


class FederationRunFailed(RuntimeError):
    """The Flower run ended without a stored aggregate; the message says how it ended."""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def _flwr(args: list[str], timeout_s: float, env: dict[str, str]) -> dict[str, Any]:
    """Run a `flwr` command with --format json and return its JSON document."""
    flwr = shutil.which("flwr", path=env["PATH"])
    if flwr is None:
        raise FileNotFoundError("the `flwr` command is not installed in this environment; pip install flwr")
    done = subprocess.run([flwr, *args, "--format", "json"], capture_output=True, text=True, timeout=timeout_s,
                          env=env, check=False)
    try:
        document = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        raise RuntimeError(f"`flwr {' '.join(args[:1])}` failed (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-2000:]}") from None
    if not document.get("success", False):
        raise RuntimeError(f"`flwr {' '.join(args[:1])}` failed: {document.get('error-message', document)}")
    return document


def _env(install_dependencies: bool) -> dict[str, str]:
    # Flower's commands (flwr, and the flower-superlink it may start) from this interpreter's environment,
    # even when it was not activated.
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    if not install_dependencies:
        # A local simulation SuperLink started by `flwr run` would otherwise `uv sync` the app's
        # dependencies into a fresh environment; this one already has them.
        env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    return env


@task(retries=2, retry_delay_seconds=5)
def start_run(app_dir: str, connection: str | None, run_config: dict[str, Any], clients: int,
              install_dependencies: bool) -> str:
    """Submit the app to the SuperLink; returns the Flower run id. Retried: it talks to the network."""
    args = ["run", app_dir]
    if connection:
        args.append(connection)
    args += ["--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())]
    if connection in (None, "local"):
        args += ["--federation-config",
                 f"num-supernodes={clients} client-resources-num-cpus=1 init-args-num-cpus={os.cpu_count() or 1}"]
    run_id = str(_flwr(args, timeout_s=300, env=_env(install_dependencies))["run-id"])
    get_run_logger().info("started Flower run %s on %s", run_id, connection or "the default connection")
    return run_id


@task
def wait_for_run(run_id: str, connection: str | None, timeout_s: float, poll_s: float) -> str:
    """Poll `flwr ls` until the run finishes; returns its final status ("finished:completed")."""
    logger = get_run_logger()
    deadline = time.monotonic() + timeout_s
    status = "unknown"
    while time.monotonic() < deadline:
        args = ["ls", "--run-id", run_id] + ([connection] if connection else [])
        runs = _flwr(args, timeout_s=60, env=_env(False)).get("runs", [])
        status = runs[0]["status"] if runs else "unknown"
        if status.startswith("finished"):
            logger.info("Flower run %s: %s", run_id, status)
            return status
        time.sleep(poll_s)
    raise TimeoutError(f"Flower run {run_id} still {status!r} after {timeout_s:g} s; stop it with "
                       f"`flwr stop {run_id}`")


@task(retries=2, retry_delay_seconds=1)
def find_aggregate(data: str | None, name: str) -> dict[str, Any] | None:
    """The stored aggregate's metadata (the ServerApp's run report), or None if the run stored none."""
    deltas = DeltaStore(open_store(data or None))
    for base in deltas.base_versions():
        if name in deltas.aggregates(base):
            _, meta = deltas.load_aggregate(name, base)
            return meta
    return None


def _report(name: str, run_id: str, meta: dict[str, Any]) -> str:
    lines = [f"# Federated run {run_id}", "",
             f"Aggregate `{name}` on base `{meta['base_version']}`: held-out bits per byte on the devices "
             f"{meta.get('initial_heldout_bpb')} -> {meta.get('final_heldout_bpb')}.", "",
             "| round | accepted | rejected | bounded | held-out bpb | DP noise multiplier | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in meta["rounds"]:
        rejected = ", ".join(f"{x['client']} ({x['code']})" for x in r["rejected"]) or "-"
        bounded = ", ".join(x["client"] for x in r["bounded"]) or "-"
        lines.append(f"| {r['server_round']} | {len(r['accepted'])} | {rejected} | {bounded} | "
                     f"{r['heldout_bpb']} | {r['noise_multiplier']} | {r['seconds']:.1f} |")
    return "\n".join(lines)


@flow(name="federate")
def federate(rounds: int = 3, clients: int = 2, aggregation: str = "clipped-mean", connection: str | None = None,
             data: str | None = None, run_config: dict[str, Any] | None = None, name: str | None = None,
             app_dir: str = str(APP_DIR), timeout_s: float = 3600.0, poll_s: float = 5.0,
             install_dependencies: bool = False) -> dict[str, Any]:
    """Run `rounds` federated rounds and return the registered result (the run's report).

    clients: size of the local simulation (ignored on a real SuperLink, whose devices connect
    themselves). run_config: any other `[tool.flwr.app.config]` key, e.g. {"dp-noise-multiplier": 1.0}.
    data: the data root (the run starts from its promoted checkpoint and stores its aggregate there).
    name: the aggregate's name (default: federated-<time>-<random>); an existing one is returned as is.
    """
    logger = get_run_logger()
    store_uri = open_store(data or None).uri  # an absolute URI: the ServerApp runs in another process
    if name is not None and (meta := find_aggregate(data, name)) is not None:
        logger.info("aggregate %s is already stored on base %s; not running again", name, meta["base_version"])
        return {"run_id": None, "status": "already stored", "aggregate": name, "store": store_uri, **meta}
    name = name or f"federated-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    config = {**(run_config or {}), "num-server-rounds": rounds, "aggregation": aggregation,
              "store": store_uri, "aggregate-name": name}
    if connection in (None, "local"):
        config.setdefault("min-clients", clients)
    run_id = start_run(app_dir, connection, config, clients, install_dependencies)
    status = wait_for_run(run_id, connection, timeout_s, poll_s)
    meta = find_aggregate(data, name)
    if meta is None:
        raise FederationRunFailed(f"Flower run {run_id} ended {status!r} without storing aggregate {name!r} in "
                                  f"{store_uri}; see `flwr log {run_id} {connection or ''}`")
    create_markdown_artifact(_report(name, run_id, meta), key="federate", description=f"federated run {run_id}")
    logger.info("registered aggregate %s on base %s (held-out bpb %s -> %s)", name, meta["base_version"],
                meta.get("initial_heldout_bpb"), meta.get("final_heldout_bpb"))
    return {"run_id": run_id, "status": status, "aggregate": name, "store": store_uri, **meta}
