"""Sleep scaling: the shared distillation of a night on 1 and 2 Ray Train workers (DDP), same data.

The run is the sleep's own code (`workers.consolidation.train_shared`: a `TorchTrainer`, each rank
reading its shard of the night and the whole rehearsal corpus, DDP averaging the gradients) on a
fixed synthetic night of notices. Scaling is strong: the global batch stays fixed and is split
over the workers, so both runs take the same optimizer steps on the same data and must reach the
same loss (the bits-per-byte terms, checked within `--loss-tolerance`); the speedup is then only a matter of time.

Samples are the replayed sequences the students read: every step reads `batch` rows of the
night, of earlier turns when there are any, and of the rehearsal corpus, each `--seq-len` bytes.
Throughput is timed inside the training loop, after the first tenth of the steps (warm-up), so
Ray's start-up of the worker group is not counted; it is reported apart as `wall_s`.

    python bench/sleep_scaling.py                        # CPU workers here (tiny preset) -> "cpu"
    python bench/sleep_scaling.py --device cuda --workers 1      # one GPU -> "gpus_1"
    python bench/sleep_scaling.py --device cuda --workers 1,2    # two GPUs of one host -> "gpus_1", "gpus_2"
    python bench/sleep_scaling.py --device cuda --workers 1,2 --global-batch 128   # the committed figure

Writes bench/results/sleep_scaling.json (sections kept from earlier runs: the CPU section from
here, the GPU ones from the lent device) and prints a table. NVLink multicast stays off
(NCCL_NVLS_ENABLE=0), as the device's README asks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "sleep_scaling.json"
# NVLink multicast off, as the device's README asks; Ray's workers inherit the driver's environment.
for variable, value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                        "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(variable, value)


def notices(count: int, seed: int) -> list[bytes]:
    """Shareable lines no model can guess: a night's worth of new material."""
    rng = random.Random(seed)

    def word(syllables: int) -> str:
        return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(syllables))

    return [f"Notice: the ferry to {word(2).title()} leaves pier {word(2).title()} at {rng.randrange(1, 12)}:"
            f"{rng.randrange(10, 59)} with {word(3)}.".encode() for _ in range(count)]


def run(workers: int, args: argparse.Namespace, storage: str) -> dict:
    """One shared sleep on `workers` workers; what it measured."""
    import torch  # noqa: PLC0415

    from model.config import preset  # noqa: PLC0415
    from model.consolidation import SleepConfig  # noqa: PLC0415
    from model.corpus import embedded_corpus  # noqa: PLC0415
    from model.lm import ReverieLM  # noqa: PLC0415
    from workers.consolidation import train_shared  # noqa: PLC0415

    torch.manual_seed(0)
    config = preset(args.preset)
    start = {k: v.detach().clone() for k, v in ReverieLM(config).state_dict().items()}
    recipe = SleepConfig(steps=args.steps, batch_size=args.global_batch // workers, seq_len=args.seq_len, lr=args.lr)
    started = time.perf_counter()
    _, metrics = train_shared(config=config, start=start, teacher=start, texts=notices(args.night_lines, seed=0),
                              earlier=[], rehearsal=embedded_corpus().train[:400_000], sleep_config=recipe,
                              storage_path=storage, run_name=f"scaling-{workers}", num_workers=workers,
                              use_gpu=args.device == "cuda")
    streams = 2  # the night and the rehearsal corpus (no earlier turns in this synthetic night)
    steps_per_s = metrics.pop("steps_per_s")
    return {"workers": workers, "preset": args.preset, "global_batch": args.global_batch,
            "batch_per_worker": recipe.batch_size, "seq_len": args.seq_len, "steps": args.steps,
            "steps_per_s": round(steps_per_s, 3),
            "samples_per_s": round(steps_per_s * args.global_batch * streams, 1),
            "bytes_per_s": round(steps_per_s * args.global_batch * streams * args.seq_len, 1),
            "wall_s": round(time.perf_counter() - started, 1), "loss": {k: round(v, 4) for k, v in metrics.items()}}


def compare(runs: dict[int, dict], tolerance: float) -> dict | None:
    """The most workers against one: speedup in samples/s, and whether the final losses agree."""
    if 1 not in runs or len(runs) < 2:
        return None
    n = max(runs)
    one, many = runs[1], runs[n]
    # The LM terms in bits per byte; the distill and anchor terms measure the distance from the
    # start, small numbers whose relative differences are noise at equal quality.
    differences = {k: abs(many["loss"][k] - v) / abs(v) for k, v in one["loss"].items()
                   if k.endswith("_bpb") and k in many["loss"] and v}
    return {"workers": n, "speedup": round(many["samples_per_s"] / one["samples_per_s"], 3),
            "loss_rel_diff": {k: round(v, 4) for k, v in differences.items()},
            "same_loss": all(v <= tolerance for v in differences.values()), "loss_tolerance": tolerance}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Sections: cpu (CPU workers), gpus_N (N GPUs, one per worker, the last run), "
                                            "gpu_by_global_batch (every GPU run, by --global-batch).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts, run in this order")
    parser.add_argument("--preset", help="model preset (default: tiny on CPU, base on CUDA)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: 40)")
    parser.add_argument("--global-batch", type=int, help="rows per stream per step, split over workers "
                                                          "(default: 16 CPU, 32 CUDA)")
    parser.add_argument("--seq-len", type=int, help="bytes per row (default: 64 CPU, 512 CUDA)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--night-lines", type=int, default=4000, help="shareable lines in the synthetic night")
    parser.add_argument("--loss-tolerance", type=float, default=0.03,
                        help="relative difference of the final losses that still counts as the same")
    parser.add_argument("--worker-logs", action="store_true", help="print the Ray Train workers' output here")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.preset = args.preset or ("base" if gpu else "tiny")
    args.steps = args.steps or 40
    args.global_batch = args.global_batch or (32 if gpu else 16)
    args.seq_len = args.seq_len or (512 if gpu else 64)
    counts = [int(n) for n in args.workers.split(",")]

    import ray  # noqa: PLC0415
    import torch  # noqa: PLC0415

    if gpu and torch.cuda.device_count() < max(counts):
        parser.error(f"--workers {args.workers} needs {max(counts)} GPUs; this machine has {torch.cuda.device_count()}")
    ray.init(num_cpus=max(2, max(counts)), num_gpus=torch.cuda.device_count() if gpu else 0,
             include_dashboard=False, log_to_driver=args.worker_logs)
    runs = {}
    try:
        with tempfile.TemporaryDirectory() as storage:
            for n in counts:
                print(f"{n} worker(s): {args.preset}, {args.steps} steps, global batch {args.global_batch} "
                      f"x {args.seq_len} bytes ...", flush=True)
                runs[n] = run(n, args, storage)
    finally:
        ray.shutdown()

    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
               "ray": ray.__version__, "device": torch.cuda.get_device_name() if gpu else "cpu",
               "measured_at": datetime.now(UTC).isoformat(timespec="seconds")}
    comparison = compare(runs, args.loss_tolerance)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if gpu:  # the layout: device, gpus_1, gpus_2, speedup (the last run), and every global batch run
        results["device"] = machine["device"]
        sections = {f"gpus_{n}": {**r, "machine": machine} for n, r in runs.items()}
        results.update(sections)
        results.setdefault("gpu_by_global_batch", {})[str(args.global_batch)] = {**sections, "comparison": comparison}
        if comparison:
            results["speedup"] = comparison["speedup"]
            results["gpu_comparison"] = comparison
    else:
        results["cpu"] = {**{f"workers_{n}": r for n, r in runs.items()}, **(comparison or {}), "machine": machine}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    if os.environ.get("OUT"):  # the device tool brings back what is written under $OUT
        Path(os.environ["OUT"], RESULTS.name).write_text(RESULTS.read_text())
    print(f"\n{'workers':>7} {'samples/s':>10} {'bytes/s':>10} {'steps/s':>8} {'wall s':>7}  final loss")
    for n, r in runs.items():
        print(f"{n:>7} {r['samples_per_s']:>10,.1f} {r['bytes_per_s']:>10,.0f} {r['steps_per_s']:>8.3f} "
              f"{r['wall_s']:>7.1f}  {r['loss']}")
    if comparison:
        print(f"speedup {comparison['workers']} vs 1: {comparison['speedup']:.2f}x (goal 1.7 on 2 GPUs); "
              f"same loss within {args.loss_tolerance:.0%}: {comparison['same_loss']} {comparison['loss_rel_diff']}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
