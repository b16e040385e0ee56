"""bench/gpu_merge.py: the suite's device calls joined into one device's results file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_merge import MergeError, merge_calls

ROOT = Path(__file__).resolve().parents[1]


def call(device: str, **sections: dict) -> dict:
    return {"meta": {"device": device, "torch": "2.11.0+cu130", "smoke": False, "started": "2026-12-05T10:00:00",
                     "total_s": 300.0},
            **{name: {"items": items} for name, items in sections.items()}}


TRAINING = {"gpt-compile": {"tokens_per_s": 500_000.0, "mfu": 0.4, "flops_per_token": 1e9},
            "reverie-graph-compiled": {"tokens_per_s": 250_000.0, "mfu": 0.2, "flops_per_token": 1e9}}
BANDWIDTH = {"copy": {"tb_s": 3.0}, "matmul": {"tflop_s": 500.0}}
BITDELTA = {"pack fp32 compiled": {"gb_s": 2400.0}}


def test_two_calls_make_one_file_whose_summary_uses_both():
    """Training from the first call, the ceilings from the second: the MFU of the measured matmul
    rate and BitDelta's fraction of copy need both."""
    merged, origins = merge_calls([("call1.json", call("NVIDIA H100 80GB HBM3", training=TRAINING)),
                                   ("call2.json", call("NVIDIA H100 80GB HBM3", bandwidth=BANDWIDTH,
                                                       bitdelta=BITDELTA))])
    assert merged["summary"]["training"]["ratio"] == pytest.approx(0.5)
    assert merged["summary"]["training"]["reverie_mfu_of_measured_matmul"] == pytest.approx(0.5)
    assert merged["summary"]["bitdelta"]["pack fp32 compiled"] == pytest.approx(0.8)
    assert [run["file"] for run in merged["meta"]["runs"]] == ["call1.json", "call2.json"]
    assert merged["meta"]["total_s"] == pytest.approx(600.0)
    assert origins == ["bandwidth   from call2.json", "training    from call1.json", "bitdelta    from call2.json"]


def test_a_later_call_replaces_a_section_unless_it_measured_nothing():
    slower = {name: {**r, "tokens_per_s": r["tokens_per_s"] / 2} for name, r in TRAINING.items()}
    calls = [("a", call("NVIDIA H200", training=TRAINING)), ("b", call("NVIDIA H200", training=slower))]
    assert merge_calls(calls)[0]["training"]["items"] == slower
    skipped = call("NVIDIA H200", training={})
    skipped["training"]["error"] = "skipped: the suite's total time budget is spent"
    assert merge_calls(calls[:1] + [("c", skipped)])[0]["training"]["items"] == TRAINING


def test_calls_from_two_devices_are_refused():
    with pytest.raises(MergeError, match="one results file holds one device's figures"):
        merge_calls([("a", call("NVIDIA H100 80GB HBM3", training=TRAINING)),
                     ("b", call("NVIDIA H200", bandwidth=BANDWIDTH))])


def test_the_command_line_refuses_a_smoke_run_and_says_why(tmp_path):
    smoke = call("cpu", training=TRAINING)
    smoke["meta"]["smoke"] = True
    (tmp_path / "smoke.json").write_text(json.dumps(smoke))
    (tmp_path / "broken.json").write_text("{\"meta\": ")
    out = tmp_path / "gpu.json"
    for name, reason in (("smoke.json", "is a run on the CPU"), ("broken.json", "can't be read as JSON")):
        done = subprocess.run([sys.executable, "bench/gpu_merge.py", str(tmp_path / name), "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and reason in done.stderr, done.stderr
    assert not out.exists()
