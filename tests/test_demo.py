"""`reverie demo` as a newcomer runs it, one command, with a short budget and a fresh data root.

The numbers it reports must be present and sane: the facts of one day are not recalled from the
weights with fast memory wiped before the sleep, and are after it (by their owner only); a new
version is promoted and served; a federated round uploads BitDeltas much smaller than the dense
delta; every phase is timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    home = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "REVERIE_DATA": str(home / "data"), "PREFECT_HOME": str(home / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0", "FLWR_HOME": str(home / "flwr")}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "demo", "--users", "2", "--pretrain-steps", "60",
                           "--port", str(free_port())], cwd=home, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return done, json.loads((home / "data" / "demo" / "report.json").read_text())


def test_the_sleep_moves_a_days_facts_into_their_owners_weights(demo):
    _, report = demo
    recall = report["recall"]
    assert recall["before_sleep"] == 0.0
    assert recall["after_sleep"] > recall["before_sleep"]
    assert recall["shared_after_sleep"] == 0.0  # nobody else's weights recall them
    assert set(recall["per_user"]) == {"ada", "ben"}


def test_a_new_version_is_promoted_and_served_after_the_sleep(demo):
    _, report = demo
    versions = report["versions"]
    assert versions["served_by_day"] == [versions["initial"]]
    assert versions["promoted"] not in (None, versions["initial"])
    assert versions["served_after_sleep"] == versions["promoted"]
    assert report["gate"] == {"passed": True, "failures": []}


def test_the_report_has_drift_uploads_and_timings(demo):
    done, report = demo
    bpb = report["bpb"]
    assert 0 < bpb["base_bpb"] < 8 and abs(bpb["bpb_rise"]) < 0.02 and abs(bpb["personal_bpb_rise"]) < 0.10
    federation = report["federation"]
    assert federation["accepted"] == [2]
    assert 0 < federation["upload_bytes_per_client"] < federation["dense_fp16_bytes"] / 8
    assert set(report["timings_s"]) >= {"pretrain", "serve", "day", "sleep", "hot-swap", "federation", "total"}
    assert Path(report["files"]["png"]).stat().st_size > 10_000
    assert "recall, memory wiped, after sleep" in done.stdout and report["files"]["json"] in done.stdout
