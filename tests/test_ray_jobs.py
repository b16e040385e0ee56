"""The sleep on a Ray cluster, as an operator drives one: `ray start --head`, then

- `ray job submit --working-dir . -- reverie sleep ...`: the job uploads this checkout (minus what
  .gitignore and .rayignore leave out), its entrypoint joins the cluster it runs on through the
  RAY_ADDRESS Ray gives it, and promotes the night;
- the `consolidate` flow called as a Prefect worker calls it, with no parameter saying where or
  how big: RAY_ADDRESS, REVERIE_SLEEP_WORKERS and REVERIE_TRAIN_STORAGE in its environment alone
  make it train the shared weights with two Ray Train workers on that cluster, with its run
  directory where configured. (RAY_ADDRESS is the GCS address here, not ray://: on a shared
  machine Ray Client's per-connection server, on ports from 23000 up, failed to start in two of
  four runs.)

The head runs in its own process group, on 127.0.0.1, with every port chosen free and its own temp
dir, so no other Ray on this machine finds it (`ray.init()` looks for `ray start` clusters in
/tmp/ray/ray_current_cluster). It is stopped by signalling that process group, not with `ray stop`,
which would stop every Ray of this user on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from storage.checkpoints import CheckpointRegistry
from storage.experience import ExperienceRecord, ExperienceWriter
from tests.conftest import free_port, start_process_group, stop_process_group

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
JOB_NIGHT, FLOW_NIGHT = "2026-01-05", "2026-01-06"
pytestmark = pytest.mark.timeout(300)


@dataclass
class Cluster:
    gcs_address: str  # what RAY_ADDRESS names
    dashboard: str  # what `ray job submit --address` names
    env: dict[str, str]  # what every command of the test runs with
    data: str  # the data root (REVERIE_DATA)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    temp = Path(tempfile.mkdtemp(prefix="rvj-", dir="/tmp"))  # short: Ray's socket paths live under it
    data = (temp / "data").as_uri()
    with ExperienceWriter(data) as writer:  # the flow's night: a shareable turn; the job's night has none
        writer.append(ExperienceRecord("carol", "s1", b"Public note: the library opens at nine, closes at six.", b"",
                                       "v0001", 3.0, shareable=True,
                                       ts=datetime.fromisoformat(FLOW_NIGHT + "T12:00:00").replace(tzinfo=UTC)))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "REVERIE_DATA": data,
           "PREFECT_HOME": str(temp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard_port = free_port(), free_port()
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
               f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               "--num-cpus=2", f"--temp-dir={temp / 'ray'}", f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}"]
    head = start_process_group(command, temp / "ray-start.log", env, cwd=temp)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, f"ray start exited: {(temp / 'ray-start.log').read_text()[-3000:]}"
            try:
                if requests.get(f"{dashboard}/api/version", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the Ray dashboard did not come up in 120 s"
            time.sleep(1)
        yield Cluster(gcs_address=f"127.0.0.1:{port}", dashboard=dashboard, env=env, data=data)
    finally:
        stop_process_group(head, linger_s=1.0)
        shutil.rmtree(temp, ignore_errors=True)


def run(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_runs_the_sleep_on_the_cluster_and_promotes(cluster):
    done = run([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
                "--runtime-env-json", json.dumps({"env_vars": {k: cluster.env[k] for k in (
                    "REVERIE_DATA", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")}}),
                "--", "reverie", "sleep", "--night", JOB_NIGHT], cluster.env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "succeeded" in output and '"status": "promoted"' in output, output[-4000:]
    assert "Connected to Ray cluster" in output  # the entrypoint joined this cluster, it started none
    registry = CheckpointRegistry(cluster.data)
    assert registry.manifest(registry.current())["night"] == JOB_NIGHT


def test_the_environment_alone_puts_the_flows_sleep_on_the_cluster_with_two_train_workers(cluster):
    """As a Prefect worker runs the nightly deployment: no ray_address, num_workers or train_storage."""
    from ray.util.state import list_actors

    train_storage = Path(tempfile.mkdtemp(prefix="rvj-train-"))
    script = ("import json, ray\n"
              "from pipelines.consolidate import consolidate\n"
              f"result = consolidate(night={FLOW_NIGHT!r}, sleep_config={{'steps': 5}})\n"
              "context = ray.get_runtime_context()\n"
              "print(json.dumps({'gcs': context.gcs_address, 'job': context.get_job_id(), "
              "'status': result['status']}))\n")
    env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address, "REVERIE_SLEEP_WORKERS": "2",
           "REVERIE_TRAIN_STORAGE": str(train_storage)}
    try:
        done = run([sys.executable, "-c", script], env)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
        assert result["status"] == "promoted"
        assert result["gcs"].rsplit(":", 1)[1] == cluster.gcs_address.rsplit(":", 1)[1]  # Ray reports the node's IP
        workers = list_actors(address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker"),
                                                                  ("job_id", "=", result["job"])], limit=100)
        assert len(workers) == 2
        assert (train_storage / f"sleep-{FLOW_NIGHT}").is_dir()
    finally:
        shutil.rmtree(train_storage, ignore_errors=True)
