"""Federation end to end, on CPU with the tiny preset:

- Flower's simulation runtime with 12 devices, seven of them malicious (one per attack), over two
  rounds, from a promoted checkpoint: every attacker is rejected or bounded with a log line that
  names it and the reason, and the honest aggregate lowers the devices' held-out bits per byte.
- A real deployment on 127.0.0.1: one SuperLink and two SuperNodes (separate processes, HTTP on free
  ports), driven by the Prefect flow `federate` through `flwr run`; the round's aggregate lands in
  the delta store, and re-running the flow under the same name runs nothing. Every process is
  killed (whole process group) when the test ends.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from federation import LOGGER_NAME
from federation.simulation import simulate
from model.config import preset
from model.corpus import embedded_corpus
from model.lm import ReverieLM
from model.training import TRAIN_PRESETS, train
from storage.checkpoints import CheckpointRegistry
from storage.deltas import DeltaStore
from tests.conftest import free_port, start_process_group, stop_process_group

ROOT = Path(__file__).resolve().parent.parent
NUM_CLIENTS = 12
ATTACKERS = {1: "nan", 2: "inf", 3: "shape", 4: "scale", 6: "stale", 8: "bloat", 10: "flip"}
REJECTED_AS = {"nan": "non-finite", "inf": "non-finite", "shape": "shape", "scale": "scale-bound",
               "stale": "stale-round", "bloat": "size-limit"}
RECIPE = {"local-steps": 8, "local-lr": 0.004, "distill-steps": 2, "client-bytes": 3000}
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Two cores are shared with Ray's workers: one thread here avoids oversubscribing them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    """A data root whose promoted checkpoint is a tiny model trained briefly on the embedded corpus."""
    uri = (tmp_path_factory.mktemp("federation") / "data").as_uri()
    torch.manual_seed(0)
    model = ReverieLM(preset("tiny"))
    train(model, embedded_corpus(), dataclasses.replace(TRAIN_PRESETS["tiny"], steps=60, batch_size=8, seq_len=64,
                                                        warmup=10, device="cpu", progress=False, eval_batches=1))
    registry = CheckpointRegistry(uri)
    version = registry.save({k: v.detach() for k, v in model.state_dict().items()},
                            {"model_config": model.config.to_dict()}, parent=None)
    registry.promote(version, expected_current=None)
    return uri


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def attacked_run(data_root) -> tuple[dict, list[str]]:
    """Two rounds over 12 simulated devices, 7 of them attacking; the server's summary and log lines."""
    collect = Collect()
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(collect)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in FLOWER_ENV.items():
                mp.setenv(key, value)
            attackers = " ".join(f"{p}:{a}" for p, a in ATTACKERS.items())
            summary = simulate(NUM_CLIENTS, {"num-server-rounds": 2, "store": data_root, "attackers": attackers,
                                             **RECIPE})
    finally:
        logger.removeHandler(collect)
    return summary, collect.lines


def partition_of(client: str) -> int:
    return int(client.rsplit("partition=", 1)[1])


def test_simulation_runs_two_rounds_over_twelve_devices_from_the_promoted_checkpoint(attacked_run):
    summary, _ = attacked_run
    assert summary["base_version"] == "v0001"
    assert [r["server_round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["sampled"] == NUM_CLIENTS for r in summary["rounds"])


@pytest.mark.parametrize("partition, attack", [(p, a) for p, a in ATTACKERS.items() if a != "flip"])
def test_each_malicious_device_is_rejected_every_round_with_a_log_line_naming_it(attacked_run, partition, attack):
    summary, lines = attacked_run
    for report in summary["rounds"]:
        rejected = {partition_of(r["client"]): r["code"] for r in report["rejected"]}
        assert rejected.get(partition) == REJECTED_AS[attack]
        assert any(f"round {report['server_round']}: rejected update from client" in line
                   and f"partition={partition}:" in line and REJECTED_AS[attack] in line for line in lines)


def test_sign_flipped_scaled_update_is_bounded_with_a_log_line_naming_it(attacked_run):
    summary, lines = attacked_run
    flipper = next(p for p, a in ATTACKERS.items() if a == "flip")
    for report in summary["rounds"]:
        assert flipper in {partition_of(c) for c in report["accepted"]}  # it passes validation...
        assert [partition_of(b["client"]) for b in report["bounded"]] == [flipper]  # ...and only it is bounded
        assert any(f"round {report['server_round']}: bounded update from client" in line
                   and f"partition={flipper} " in line and "clipped to norm" in line for line in lines)


def test_honest_devices_are_accepted(attacked_run):
    summary, _ = attacked_run
    honest = set(range(NUM_CLIENTS)) - set(ATTACKERS)
    for report in summary["rounds"]:
        flipper = next(p for p, a in ATTACKERS.items() if a == "flip")
        assert {partition_of(c) for c in report["accepted"]} == honest | {flipper}


def test_honest_aggregate_lowers_the_devices_heldout_bits_per_byte(attacked_run):
    summary, _ = attacked_run
    bpb = [summary["initial_heldout_bpb"]] + [r["heldout_bpb"] for r in summary["rounds"]]
    assert bpb[1] < bpb[0] and bpb[2] < bpb[1], bpb
    assert bpb[2] < bpb[0] - 0.1, bpb


def test_devices_upload_bitdeltas_not_dense_weights(attacked_run):
    summary, _ = attacked_run
    train = summary["rounds"][0]["train"]
    assert train["upload-bytes"] == 12408  # tiny preset: 98,560 sign bits + 22 fp32 scales
    assert 2 * 98_560 / train["upload-bytes"] > 15


def test_the_run_aggregate_is_stored_for_the_next_sleep(attacked_run, data_root):
    summary, _ = attacked_run
    stored = DeltaStore(data_root).load_aggregate(summary["aggregate"]["name"], "v0001")
    assert stored is not None
    tensors, meta = stored
    assert meta["format"] == "dense-fp32" and meta["run_tag"] == summary["run_tag"]
    assert len(tensors) == summary["matrices"] and all(torch.isfinite(t).all() for t in tensors.values())
    assert [len(r["rejected"]) for r in meta["rounds"]] == [6, 6]


# --- a real deployment: SuperLink + 2 SuperNodes on loopback -----------------------------------


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def loopback_federation(tmp_path) -> Iterator[dict[str, str]]:
    """A SuperLink and two SuperNodes (partitions 0 and 1) on 127.0.0.1, insecure (loopback only)."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    link_port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # this venv's Flower
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "PATH": path}
    processes = []
    try:
        link_log = tmp_path / "superlink.log"
        link = start_process_group([shutil.which("flower-superlink", path=path), "--insecure", "--host", "127.0.0.1",
                      "--port", str(link_port), "--disable-runtime-dependency-installation"], link_log, env)
        processes.append(link)
        wait_for_port(link_port, link, link_log)
        for partition in (0, 1):
            node_log = tmp_path / f"supernode-{partition}.log"
            node_port = free_port()
            node = start_process_group([shutil.which("flower-supernode", path=path), "--insecure",
                          "--superlink", f"127.0.0.1:{link_port}", "--port", str(node_port), "--max-retries", "10",
                          "--node-config", f"partition-id={partition} num-partitions=2"], node_log, env)
            processes.append(node)
            wait_for_port(node_port, node, node_log)
        yield env
    finally:
        for process in reversed(processes):
            stop_process_group(process, term_wait_s=10)
        for log in sorted(tmp_path.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-2000:]}")  # shown by pytest only on failure


def test_superlink_and_two_supernodes_on_loopback_run_a_round_driven_by_the_federate_flow(
        loopback_federation, data_root, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.federate import federate

    assert shutil.which("flwr", path=loopback_federation["PATH"])
    for key, value in loopback_federation.items():
        monkeypatch.setenv(key, value)
    with prefect_test_harness(server_startup_timeout=120):
        result = federate(rounds=1, connection="loopback", data=data_root, timeout_s=240, poll_s=2,
                          run_config={"min-clients": 2, "fraction-evaluate": 0.0, "local-steps": 3,
                                      "distill-steps": 0, "client-bytes": 2000})
        again = federate(rounds=1, connection="loopback", data=data_root, name=result["aggregate"])
    assert result["status"] == "finished:completed"
    assert again["status"] == "already stored" and again["run_tag"] == result["run_tag"]  # a re-run runs nothing
    (report,) = result["rounds"]
    assert len(report["accepted"]) == 2 and not report["rejected"]
    assert {c.rsplit("partition=", 1)[1] for c in report["accepted"]} == {"0", "1"}
    assert result["aggregate"] in DeltaStore(data_root).aggregates("v0001")
