"""Federated personalization: upload size, round time, BitDelta quality and robustness to attackers.

Tiny preset on CPU, synthetic per-device text (federation.data). The base is a tiny model trained
briefly on the embedded corpus and promoted in a temporary checkpoint registry, as a sleep would.

    compression   bytes a device uploads (BitDelta: packed signs + fp32 scales, and the same on the
                  wire with its .npy framing) against the dense delta of the same matrices in fp16
                  and fp32.
    round time    one round (train + evaluate) over 10 / 50 / 100 simulated devices in Flower's
                  simulation runtime (Ray, one CPU per ClientApp, all cores of this machine).
    quality       held-out bits per byte on each device's own held-out text: base weights, the dense
                  fine-tune, its BitDelta with scales mean|delta|, and with distilled scales.
    attack        held-out bits per byte after 2 rounds with 0 / 10 / 20 % of the devices sending a
                  sign-flipped update at the largest scale validation admits (the attack that passes
                  validation; malformed ones are rejected outright, see tests), in Flower's simulation
                  with the default clipped-mean; plus one round of every aggregation method on the
                  same updates in-process, with an unclipped mean as the undefended baseline.

    python -m bench.federation [--quick]      (or python bench/federation.py)

Writes bench/results/federation.json and federation.png and prints a summary.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/federation.py` puts bench/ first on sys.path, where this very file would shadow the
# `federation` package: take it out (with `python -m bench.federation` there is nothing to do).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import copy
import dataclasses
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime

import numpy as np
import torch

from federation.aggregation import RobustConfig, aggregate
from federation.attacks import corrupt
from federation.data import synthetic_corpus
from federation.simulation import simulate
from federation.task import heldout_bpb, matrix_shapes
from federation.validation import ArraySpec, RoundExpectation, validate_update
from federation.wire import dense_nbytes, payload_nbytes, to_wire
from model.bitdelta import BitDeltaConfig, applied, compress, distill_scales, select_matrices
from model.config import preset
from model.corpus import as_tensor, embedded_corpus, random_batch
from model.lm import ReverieLM
from model.personalize import PersonalizeConfig, personalize
from model.training import TRAIN_PRESETS, train
from storage.checkpoints import CheckpointRegistry

RESULTS = Path(__file__).parent / "results"
# Recipes of the simulated runs: the app's defaults but for fewer local steps, so that the attack runs
# (2 rounds x 10 devices x 3) and the 100-device round fit in a few minutes on 2 cores. The round-time
# runs use the lighter one; their device compute time is reported beside the round time.
SIM_RECIPE = {"local-steps": 10, "local-lr": 0.003, "distill-steps": 4, "client-bytes": 6000}
TIMING_RECIPE = {"local-steps": 5, "local-lr": 0.003, "distill-steps": 0, "client-bytes": 3000}
DEFAULT = {"local_steps": 20, "local_lr": 3e-3, "distill_steps": 10}  # federation.settings defaults


def pretrained_base(root: str, steps: int) -> ReverieLM:
    torch.manual_seed(0)
    model = ReverieLM(preset("tiny"))
    train(model, embedded_corpus(), dataclasses.replace(TRAIN_PRESETS["tiny"], steps=steps, batch_size=8, seq_len=64,
                                                        warmup=20, device="cpu", progress=False))
    registry = CheckpointRegistry(root)
    version = registry.save({k: v.detach() for k, v in model.state_dict().items()},
                            {"model_config": model.config.to_dict()}, parent=None)
    registry.promote(version, expected_current=None)
    return model.eval()


def compression(base: ReverieLM, delta) -> dict:
    from flwr.app import Array  # noqa: PLC0415 - only to measure the real wire framing

    shapes = matrix_shapes(base, "linear")
    wire = sum(len(Array(a).data) for a in to_wire(delta, list(shapes)).values())
    payload = payload_nbytes(shapes)
    return {"matrices": len(shapes), "weights": sum(int(np.prod(s)) for s in shapes.values()),
            "bitdelta_payload_bytes": payload, "bitdelta_wire_bytes": wire,
            "fp16_delta_bytes": dense_nbytes(shapes, 2), "fp32_delta_bytes": dense_nbytes(shapes, 4),
            "compression_vs_fp16": round(dense_nbytes(shapes, 2) / payload, 2),
            "compression_vs_fp32": round(dense_nbytes(shapes, 4) / payload, 2),
            "wire_compression_vs_fp16": round(dense_nbytes(shapes, 2) / wire, 2)}


def quality(base: ReverieLM, devices: int) -> tuple[dict, list]:
    """Per device: fine-tune with the app's default recipe; bpb of base, dense, BitDelta, distilled."""
    names = select_matrices(base, BitDeltaConfig())
    rows, deltas = [], []
    for partition in range(devices):
        corpus = synthetic_corpus(partition, SIM_RECIPE["client-bytes"])
        tuned_state = personalize(base, corpus.train, PersonalizeConfig(steps=DEFAULT["local_steps"],
                                                                        lr=DEFAULT["local_lr"], seed=partition),
                                  trainable=names)
        tuned = copy.deepcopy(base)
        tuned.load_state_dict(tuned_state)
        delta = compress(base.state_dict(), tuned_state, names, "v0001")
        generator = torch.Generator().manual_seed(partition)
        calibration = [random_batch(as_tensor(corpus.train), 4, 64, generator)[0] for _ in range(4)]
        distilled, _ = distill_scales(base, delta, tuned, calibration,
                                      BitDeltaConfig(distill_steps=DEFAULT["distill_steps"], max_scale=0.06))
        row = {"base": heldout_bpb(base, corpus, 64), "dense": heldout_bpb(tuned.eval(), corpus, 64)}
        with applied(base, delta):
            row["bitdelta"] = heldout_bpb(base, corpus, 64)
        with applied(base, distilled):
            row["bitdelta_distilled"] = heldout_bpb(base, corpus, 64)
        rows.append(row)
        deltas.append(distilled)
    mean = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}
    gain = mean["base"] - mean["dense"]
    result = {"devices": devices, "recipe": {**DEFAULT, "batch_size": 8, "seq_len": 64}, "heldout_bpb": mean,
              "bitdelta_keeps_of_dense_gain": round((mean["base"] - mean["bitdelta"]) / gain, 3),
              "distilled_keeps_of_dense_gain": round((mean["base"] - mean["bitdelta_distilled"]) / gain, 3),
              "per_device": rows}
    return result, deltas


def attack_methods(base: ReverieLM, deltas: list, percents: list[int]) -> dict:
    """One round from the base, in-process, on the same honest updates: every method, k flippers."""
    shapes = matrix_shapes(base, "linear")
    names, bound = list(shapes), DEFAULT["local_lr"] * DEFAULT["local_steps"]
    expect = RoundExpectation(server_round=1, model_version="v0001", shapes=shapes, max_scale=bound)
    corpora = [synthetic_corpus(p, SIM_RECIPE["client-bytes"]) for p in range(len(deltas))]
    methods = {"mean (undefended)": RobustConfig(method="clipped-mean", clip_norm=1e12),
               "clipped-mean": RobustConfig(method="clipped-mean"),
               "trimmed-mean": RobustConfig(method="trimmed-mean"), "sign-vote": RobustConfig(method="sign-vote")}
    out: dict = {name: {} for name in methods}
    for pct in percents:
        k = round(len(deltas) * pct / 100)
        updates = []
        for i, delta in enumerate(deltas):
            arrays = to_wire(delta, names)
            if i < k:
                arrays, _ = corrupt(arrays, "flip", 1, bound)
            specs = {key: ArraySpec(str(a.dtype), a.shape, a.nbytes) for key, a in arrays.items()}
            updates.append(validate_update(1, "v0001", specs, lambda a=arrays: a, expect))
        for name, config in methods.items():
            result = aggregate(updates, config)
            model = copy.deepcopy(base)
            with torch.no_grad():
                for param_name, d in result.delta.items():
                    model.get_parameter(param_name).add_(d)
            out[name][str(pct)] = round(float(np.mean([heldout_bpb(model, c, 64) for c in corpora])), 4)
    return out


def simulated(root: str, clients: int, rounds: int, recipe: dict, attackers: str = "") -> dict:
    started = time.perf_counter()
    summary = simulate(clients, {"num-server-rounds": rounds, "store": root, "attackers": attackers, **recipe},
                       num_cpus=os.cpu_count() or 2)
    return {"wall_seconds": round(time.perf_counter() - started, 1), "summary": summary}


def plot(results: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    c = results["bytes_per_client"]
    labels = ["BitDelta", "BitDelta\n(on the wire)", "fp16 delta", "fp32 delta"]
    values = [c["bitdelta_payload_bytes"], c["bitdelta_wire_bytes"], c["fp16_delta_bytes"], c["fp32_delta_bytes"]]
    axes[0, 0].bar(labels, [v / 1024 for v in values], color=["C2", "C2", "C1", "C3"])
    axes[0, 0].set_ylabel("KiB uploaded per device per round")
    axes[0, 0].set_title(f"upload: {c['compression_vs_fp16']}x smaller than fp16")
    rt = results["round_seconds"]
    axes[0, 1].plot([int(n) for n in rt], list(rt.values()), "o-")
    axes[0, 1].set_xlabel("simulated devices")
    axes[0, 1].set_ylabel("seconds per round (train + evaluate)")
    axes[0, 1].set_title(f"round time, {results['machine']['cpus']} CPU cores, "
                         f"{results['round_timing']['recipe']['local-steps']} local steps")
    q = results["quality"]["heldout_bpb"]
    axes[1, 0].bar(["base", "dense\nfine-tune", "BitDelta", "BitDelta\ndistilled"],
                   [q["base"], q["dense"], q["bitdelta"], q["bitdelta_distilled"]], color=["C7", "C1", "C2", "C2"])
    axes[1, 0].set_ylim(min(q.values()) - 0.3, max(q.values()) + 0.1)
    axes[1, 0].set_ylabel("held-out bits per byte (device's own text)")
    axes[1, 0].set_title("personal fine-tune: dense vs 1-bit")
    for name, series in results["attack_methods"].items():
        axes[1, 1].plot([int(p) for p in series], list(series.values()), "o--", label=f"{name} (1 round)")
    attack = results["attack"]
    axes[1, 1].plot([int(p) for p in attack], [v["bpb"] for v in attack.values()], "ks-", lw=2,
                    label="clipped-mean, Flower sim (2 rounds)")
    axes[1, 1].axhline(results["attack"]["0"]["initial_bpb"], color="C7", ls=":", label="base")
    axes[1, 1].set_xlabel("% devices sending sign-flipped max-scale updates")
    axes[1, 1].set_ylabel("held-out bits per byte after aggregation")
    axes[1, 1].legend(fontsize=7)
    axes[1, 1].set_title("robustness")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test, not for results)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    torch.set_num_threads(1)  # Ray's ClientApps each get one core too
    scales = [10, 20] if args.quick else [10, 50, 100]
    percents = [0, 10, 20]
    started = time.perf_counter()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="reverie-bench-federation-") as tmp:
        root = (Path(tmp) / "data").as_uri()
        base = pretrained_base(root, 60 if args.quick else 150)
        print(f"base: {base.num_params():,} params, trained {time.perf_counter() - started:.0f} s", flush=True)
        q, deltas = quality(base, 4 if args.quick else 10)
        print("quality:", json.dumps(q["heldout_bpb"]), flush=True)
        results = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
                   "load_average_1m_at_start": round(load, 2),
                   "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                               "platform": platform.platform()},
                   "model": {"preset": "tiny", "params": base.num_params()},
                   "bytes_per_client": compression(base, deltas[0]), "quality": q,
                   "simulation_recipe": SIM_RECIPE}
        results["compression_vs_fp16"] = results["bytes_per_client"]["compression_vs_fp16"]
        results["attack_methods"] = attack_methods(base, deltas, percents)
        print("attack (in-process, 1 round):", json.dumps(results["attack_methods"]), flush=True)
        attack, runs = {}, {}
        for pct in percents:
            n = scales[0]
            flippers = " ".join(f"{p}:flip" for p in range(round(n * pct / 100)))
            run = simulated(root, n, 2, SIM_RECIPE, flippers)
            s = run["summary"]
            attack[str(pct)] = {"bpb": round(s["final_heldout_bpb"], 4),
                                "initial_bpb": round(s["initial_heldout_bpb"], 4),
                                "per_round_bpb": [round(r["heldout_bpb"], 4) for r in s["rounds"]],
                                "bounded_per_round": [len(r["bounded"]) for r in s["rounds"]],
                                "devices": n, "attackers": round(n * pct / 100)}
            runs[f"attack-{pct}"] = run
            print(f"attack {pct}%: {attack[str(pct)]}", flush=True)
        results["attack"] = attack
        round_seconds, device_seconds = {}, {}
        for n in scales:
            run = simulated(root, n, 1, TIMING_RECIPE)
            runs[f"scale-{n}"] = run
            report = run["summary"]["rounds"][0]
            round_seconds[str(n)] = round(report["seconds"], 1)
            device_seconds[str(n)] = round(report["train"]["device-seconds"], 2)
            print(f"{n} devices: {round_seconds[str(n)]} s per round, {device_seconds[str(n)]} s of compute per "
                  f"device", flush=True)
        results["round_seconds"] = round_seconds
        results["round_timing"] = {"recipe": TIMING_RECIPE, "cpus": os.cpu_count(),
                                   "device_compute_seconds_mean": device_seconds,
                                   "note": "a round = train + evaluate on every device; devices share the cores, "
                                           "so round time ~ devices x device time / cores + overhead"}
        results["runs"] = {name: {"wall_seconds": r["wall_seconds"],
                                  "rounds": [{k: v for k, v in rep.items() if k not in ("accepted",)}
                                             for rep in r["summary"]["rounds"]]} for name, r in runs.items()}
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "federation.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "federation.png")
    print(json.dumps({k: results[k] for k in ("compression_vs_fp16", "round_seconds", "attack", "total_seconds")},
                     indent=2))
    print(f"wrote {args.out / 'federation.json'} and federation.png")


if __name__ == "__main__":
    sys.exit(main())
