"""Adaptive compute: layers (and time) saved against bits per byte lost, on easy and hard requests.

1. Train a 6-layer model with the early-exit auxiliary loss (or load one with --checkpoint).
2. Build three kinds of 256-byte requests from the held-out corpus: `repetitive` (a held-out
   passage of 32-64 bytes quoted over and over), `prose` (held-out text as it is) and `noise`
   (random bytes). Each kind is split in two: a calibration half and a test half.
3. Calibrate the depth policy on the calibration halves (all kinds pooled), then run every test
   request adaptively and at full depth, and report per kind: mean complexity, mean layers run,
   active parameters, latency, bits per byte adaptive vs full, and the estimator's cost relative to
   a full forward. Fixed-depth exits (every request at k layers) are the baseline.

Writes bench/results/adaptive_compute.json and adaptive_compute.png.

    python bench/adaptive_compute.py                        # trains first (GPU if present)
    python bench/adaptive_compute.py --checkpoint m.safetensors --steps 0
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from model.adaptive import AdaptiveDepth, calibrate, exit_bpb
from model.config import ModelConfig
from model.corpus import embedded_corpus
from model.lm import ReverieLM
from model.training import TrainConfig, train

RESULTS = Path(__file__).parent / "results"
CONFIG = ModelConfig(d_model=128, n_blocks=2, layers_per_block=3, n_heads=4, span=64, window=256, pm_rank=4,
                     em_slots=32, em_topk=2, ff_mult=4, max_seq_len=512)


def requests(heldout: bytes, length: int, seed: int = 0) -> dict[str, list[bytes]]:
    """Requests of `length` + 1 bytes (inputs + the byte after each) by kind."""
    rng = random.Random(seed)
    prose = [heldout[i:i + length + 1] for i in range(0, len(heldout) - length - 1, length + 1)]
    repetitive = []
    for _ in range(len(prose)):
        period = rng.choice((32, 48, 64))
        start = rng.randrange(0, len(heldout) - period)
        repetitive.append((heldout[start:start + period] * (length // period + 2))[:length + 1])
    noise = [bytes(rng.randrange(256) for _ in range(length + 1)) for _ in range(24)]
    return {"repetitive": repetitive, "prose": prose, "noise": noise}


def latency_ms(call, repeats: int = 5) -> float:
    """Fastest of `repeats` calls, in ms (noise only adds time)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000.0)
    return min(times)


@torch.no_grad()
def measure(model: ReverieLM, adaptive: AdaptiveDepth, texts: list[bytes]) -> dict:
    table = exit_bpb(model, texts)  # (n, layers): bits per byte at every depth
    n_layers = model.config.n_layers
    full_params = model.active_params(n_layers)
    rows = []
    for i, text in enumerate(texts):
        tokens = torch.tensor(list(text[:-1]))[None]
        score, layers = adaptive.plan(tokens)
        adaptive_ms = latency_ms(lambda: adaptive(tokens))
        metrics = dict(model.last_metrics)
        full_ms = latency_ms(lambda: model(tokens))
        estimator_ms = latency_ms(lambda: adaptive.plan(tokens))
        rows.append({"complexity": score, "layers": layers, "active_params": metrics["active_params"],
                     "adaptive_ms": adaptive_ms, "full_ms": full_ms, "estimator_ms": estimator_ms,
                     "bpb_adaptive": float(table[i, layers - 1]), "bpb_full": float(table[i, -1])})
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    return {
        "requests": len(rows),
        "complexity": mean("complexity"),
        "layers": mean("layers"),
        "layers_histogram": {k: sum(r["layers"] == k for r in rows) for k in range(1, n_layers + 1)},
        "active_params_fraction": mean("active_params") / full_params,
        "latency_ms_adaptive": mean("adaptive_ms"),
        "latency_ms_full": mean("full_ms"),
        "latency_saved_fraction": 1.0 - mean("adaptive_ms") / mean("full_ms"),
        "estimator_fraction_of_full_forward": statistics.median(r["estimator_ms"] / r["full_ms"] for r in rows),
        "bpb_adaptive": mean("bpb_adaptive"),
        "bpb_full": mean("bpb_full"),
        "bpb_lost": mean("bpb_adaptive") - mean("bpb_full"),
        "bpb_by_fixed_depth": [float(x) for x in table.mean(axis=0)],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {"repetitive": "tab:green", "prose": "tab:blue", "noise": "tab:gray"}
    n_layers = result["config"]["n_blocks"] * result["config"]["layers_per_block"]
    for kind, stats in result["kinds"].items():
        fixed = np.array(stats["bpb_by_fixed_depth"])
        ax.plot(np.arange(1, n_layers + 1) / n_layers, fixed - fixed[-1], "o:", color=colors[kind], alpha=0.6,
                label=f"{kind}: fixed depth")
        ax.plot(stats["layers"] / n_layers, stats["bpb_lost"], "*", ms=15, color=colors[kind],
                label=f"{kind}: adaptive")
    ax.axhline(result["tolerance"], color="k", lw=0.6, ls="--", label="calibration tolerance")
    ax.set_yscale("symlog", linthresh=0.1)  # noise loses bits on a scale of its own
    ax.set_xlabel("fraction of layers run")
    ax.set_ylabel("bits per byte lost vs full depth")
    ax.set_title("Early exit chosen by input complexity (test halves)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="start from this model (trained further if --steps > 0)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--early-exit-weight", type=float, default=1.0)
    parser.add_argument("--device", default="auto", help="training device")
    parser.add_argument("--save", help="save the trained model here (safetensors + JSON sidecar)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="bits per byte an exit may lose in calibration")
    parser.add_argument("--length", type=int, default=256, help="bytes per request")
    parser.add_argument("--threads", type=int, default=4, help="CPU threads for the measurements")
    parser.add_argument("--out", type=Path, default=RESULTS / "adaptive_compute.json")
    args = parser.parse_args()

    corpus = embedded_corpus()
    torch.manual_seed(0)
    model, info = ReverieLM(CONFIG), {}
    if args.checkpoint:
        from model.checkpoint import load_checkpoint

        model, info = load_checkpoint(args.checkpoint)
    training = info.get("training", {})
    if args.steps:
        config = TrainConfig(steps=args.steps, batch_size=64, seq_len=128, lr=2e-3, warmup=100, device=args.device,
                             early_exit_weight=args.early_exit_weight, eval_batches=8)
        print(f"training {model.num_params():,} parameters for {args.steps} steps on {config.resolved_device()}")
        result = train(model, corpus, config)
        training = {"steps": args.steps, "device": str(config.resolved_device()), "seconds": result.seconds,
                    "early_exit_weight": args.early_exit_weight, "heldout_bpb": result.heldout_bpb}
        if args.save:
            from model.checkpoint import save_checkpoint

            save_checkpoint(model, args.save, {"training": training})
    model = model.cpu().eval()
    torch.set_num_threads(args.threads)

    kinds = requests(corpus.heldout, args.length)
    calibration = [t for texts in kinds.values() for t in texts[0::2]]
    policy = calibrate(model, calibration, tolerance=args.tolerance)
    adaptive = AdaptiveDepth(model, policy)
    print(f"policy: {policy.to_dict()}")
    result = {"config": model.config.to_dict(), "training": training, "tolerance": args.tolerance,
              "request_bytes": args.length, "measured_on": f"cpu, {args.threads} threads",
              "policy": policy.to_dict(),
              "calibration_requests": {k: len(v[0::2]) for k, v in kinds.items()},
              "kinds": {kind: measure(model, adaptive, texts[1::2]) for kind, texts in kinds.items()}}
    pooled = {k: sum(s[k] * s["requests"] for s in result["kinds"].values()) / sum(s["requests"] for s in
                                                                                  result["kinds"].values())
              for k in ("layers", "active_params_fraction", "bpb_adaptive", "bpb_full", "latency_ms_adaptive",
                        "latency_ms_full")}
    result["all"] = {**pooled, "bpb_lost": pooled["bpb_adaptive"] - pooled["bpb_full"],
                     "latency_saved_fraction": 1 - pooled["latency_ms_adaptive"] / pooled["latency_ms_full"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(f"{'kind':<11}{'complexity':>11}{'layers':>8}{'params':>8}{'ms':>14}{'bpb':>16}{'lost':>7}{'est/fwd':>9}")
    for kind, s in result["kinds"].items():
        print(f"{kind:<11}{s['complexity']:>11.2f}{s['layers']:>8.2f}{s['active_params_fraction']:>8.0%}"
              f"{s['latency_ms_adaptive']:>7.1f}/{s['latency_ms_full']:<6.1f}"
              f"{s['bpb_adaptive']:>8.3f}/{s['bpb_full']:<7.3f}{s['bpb_lost']:>7.3f}"
              f"{s['estimator_fraction_of_full_forward']:>9.2%}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
