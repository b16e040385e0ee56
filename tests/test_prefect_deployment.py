"""The deployments of prefect.yaml as an operator runs them, on 127.0.0.1 (docs/prefect.md):

    prefect server start -> prefect work-pool create reverie --type process -> prefect deploy --all
    -> prefect worker start --pool reverie -> prefect deployment run consolidate/nightly

Every step is the real `prefect` command in its own process group, with its own PREFECT_HOME; the
worker runs the flow in a subprocess that starts its own local Ray. The data root holds a tiny
promoted checkpoint and one night of one user's experience; the sleep is a few steps with a gate
that a few steps pass, so the run takes about a minute on two busy cores. Every process is killed
(whole process group) when the module ends, pass or fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
import torch

from model.config import preset
from model.lm import ReverieLM
from storage.checkpoints import CheckpointRegistry
from storage.experience import ExperienceRecord, ExperienceWriter
from tests.conftest import free_port, start_process_group, stop_process_group

ROOT = Path(__file__).resolve().parent.parent
NIGHT = "2026-01-05"
# A few sleep steps recall nothing yet; the gate here only asks that nothing breaks or leaks.
TINY_NIGHT = {"night": NIGHT, "sleep_config": {"steps": 3},
              "gate": {"min_recall": 0.0, "max_bpb_rise": 1.0, "max_personal_bpb_rise": 1.0}}
pytestmark = pytest.mark.timeout(420)


@dataclass
class PrefectServer:
    api_url: str
    env: dict[str, str]  # what every `prefect` command of the test runs with
    data: str  # the data root given to `prefect deploy` (REVERIE_DATA)


def prefect(*args: str, env: dict[str, str], timeout: float = 180) -> str:
    """Run `prefect ARGS` from the repository root; its output, or an error that shows it."""
    done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"prefect {' '.join(args)} exited with {done.returncode}:\n{output[-4000:]}"
    return output


def start(args: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """`prefect ARGS` in its own process group, so that it and every flow run it spawns can be killed."""
    return start_process_group([sys.executable, "-m", "prefect", *args], log, env, cwd)


def wait_until_healthy(api_url: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"{api_url}/health", timeout=5).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise TimeoutError(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-4000:]}")


def seed_data_root(data: str) -> None:
    """A promoted tiny checkpoint (v0001) and one user's turn on NIGHT."""
    torch.manual_seed(0)
    config = preset("tiny")
    registry = CheckpointRegistry(data)
    weights = {k: v.detach().contiguous() for k, v in ReverieLM(config).state_dict().items()}
    registry.promote(registry.save(weights, {"model_config": config.to_dict()}, parent=None), expected_current=None)
    with ExperienceWriter(data) as writer:
        writer.append(ExperienceRecord("alice", "s1", b"The secret word of Mira is tovak.", b"", "v0001", 3.0,
                                       ts=datetime.fromisoformat(NIGHT + "T12:00:00").replace(tzinfo=UTC)))


def read_deployment(server: PrefectServer, name: str):
    from prefect.client.orchestration import get_client  # noqa: PLC0415 - Prefect loads slowly
    from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: PLC0415

    with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """A Prefect server on a free port, the `reverie` process pool, both deployments, one worker."""
    tmp = tmp_path_factory.mktemp("prefect")
    data = (tmp / "data").as_uri()
    seed_data_root(data)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "REVERIE_", "RAY_"))}
    env = {**inherited, "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": api_url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "OMP_NUM_THREADS": "1"}
    processes: list[subprocess.Popen] = []
    try:
        # No scheduler: the test starts its run by hand, and tonight's 03:00 run is none of its business.
        server_log = tmp / "server.log"
        processes.append(start(["server", "start", "--host", "127.0.0.1", "--port", str(port),
                                "--no-ui", "--no-scheduler"], server_log, env, tmp))
        wait_until_healthy(api_url, processes[0], server_log)
        prefect("work-pool", "create", "reverie", "--type", "process", env=env)
        prefect("--no-prompt", "deploy", "--all", env={**env, "REVERIE_DATA": data})
        # The worker starts in another directory: the deployment's pull step takes each run to this checkout.
        processes.append(start(["worker", "start", "--pool", "reverie"], tmp / "worker.log", env, tmp))
        yield PrefectServer(api_url, env, data)
    finally:
        for process in reversed(processes):  # the worker first, while the server still hears it stop
            stop_process_group(process)
        for log in sorted(tmp.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")  # shown by pytest only on failure


def test_deployment_run_on_a_process_worker_completes_and_promotes_a_new_version(prefect_server):
    registry = CheckpointRegistry(prefect_server.data)
    assert registry.current() == "v0001"
    params = [arg for key, value in TINY_NIGHT.items() for arg in ("--param", f"{key}={json.dumps(value)}")]
    output = prefect("deployment", "run", "consolidate/nightly", *params, "--watch", "--watch-timeout", "300",
                     env=prefect_server.env, timeout=330)
    assert "Flow run finished successfully in 'Completed'" in output
    current = registry.current()
    assert current == "v0002" and registry.manifest(current)["night"] == NIGHT
    assert registry.manifest(current)["parent"] == "v0001"


def test_both_deployments_read_the_data_root_from_the_environment_of_prefect_deploy(prefect_server):
    nightly = read_deployment(prefect_server, "consolidate/nightly")
    search = read_deployment(prefect_server, "search/on-demand")
    assert nightly.parameters == {"data": prefect_server.data, "ray_address": ""}  # "" = a local Ray
    assert search.parameters == {"data_root": prefect_server.data, "ray_address": ""}
    assert nightly.work_pool_name == search.work_pool_name == "reverie"
    assert not search.schedules


def test_nightly_runs_at_three_utc_unless_REVERIE_SLEEP_CRON_says_otherwise(prefect_server):
    def schedule() -> tuple[str, str]:
        (only,) = read_deployment(prefect_server, "consolidate/nightly").schedules
        return only.schedule.cron, only.schedule.timezone

    assert schedule() == ("0 3 * * *", "UTC")
    prefect("--no-prompt", "deploy", "--name", "nightly",
            env={**prefect_server.env, "REVERIE_DATA": prefect_server.data, "REVERIE_SLEEP_CRON": "30 1 * * 1-5"})
    assert schedule() == ("30 1 * * 1-5", "UTC")  # replaced, not added
