"""Where a step's GPU time goes: one training or decode step under torch.profiler, kernels grouped.

A CUDA graph hides its kernels from the profiler, so this runs the step the suite captures
(bench/gpu_suite.py) without the graph and sums the GPU time of its kernels by name: the next
lever is chosen from a measurement. Prints the top kernels and adds a run to
bench/results/kernel_profile.json under its name.

    python bench/kernel_profile.py train                      # base, b=16, T=2048, writes compiled
    python bench/kernel_profile.py train --compile-layers     # as reverie-graph-compiled
    python bench/kernel_profile.py decode --batch 256 --learn --compile   # one graph+compile step
    python bench/kernel_profile.py train --preset tiny --batch 2 --seq-len 128   # anywhere (CPU ops)
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.gpu_suite import warm_state  # noqa: E402
from model.decode_graph import sync_free_step  # noqa: E402
from bench.results_file import save_section  # noqa: E402
from model.config import preset  # noqa: E402
from model.lm import ReverieLM, bits_per_byte  # noqa: E402
from model.memory import compiled_writes  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "kernel_profile.json"


def training_step(lm: ReverieLM, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = torch.randint(0, 256, (args.batch, args.seq_len + 1), device=device)
    if args.compile_layers:
        lm.compile_layers()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, _ = lm(data[:, :-1])
            loss = bits_per_byte(logits, data[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def decode_step(lm: ReverieLM, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    """The suite's decode step (sync-free, donated state) from a warm state at 2K context."""
    lm.eval()
    holder = {"state": warm_state(lm.config, args.batch, device, seed=args.batch, start=lm.config.max_seq_len)}
    byte = torch.randint(0, 256, (args.batch,), device=device)
    run = torch.compile(sync_free_step, dynamic=False) if args.compile else sync_free_step

    @torch.no_grad()
    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, holder["state"] = run(lm, byte, holder["state"], args.learn, donate_state=True)
    return step


def kernel_table(prof: profile, cuda: bool) -> dict[str, list[float]]:
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA if cuda else event.cpu_parent is None
        if on_device:
            entry = kernels[event.name[:90]]
            entry[0] += 1
            entry[1] += (event.device_time if cuda else event.cpu_time_total) / 1000.0
    return kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("train", "decode"))
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048, help="train: bytes per row")
    parser.add_argument("--eager-writes", action="store_true", help="train: the eager memory write, not the compiled one")
    parser.add_argument("--compile-layers", action="store_true", help="train: ReverieLM.compile_layers() first")
    parser.add_argument("--compile-loops", action="store_true",
                        help="train: each memory's span loop as one compiled function (compiled_writes(loops=True))")
    parser.add_argument("--learn", action="store_true", help="decode: write fast memory")
    parser.add_argument("--compile", action="store_true", help="decode: torch.compile the step")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # as bench/gpu_suite.py: the fp32 memory math on tensor cores
    torch.manual_seed(0)
    lm = ReverieLM(preset(args.preset)).to(device)
    if args.what == "train":
        step = training_step(lm, args, device)
        name = (f"train, writes {'eager' if args.eager_writes else 'compiled'}" + (", loops compiled" if args.compile_loops else "")
                + (", layers compiled" if args.compile_layers else ""))
        settings = {"seq_len": args.seq_len, "compile_layers": args.compile_layers, "compile_loops": args.compile_loops}
    else:
        step = decode_step(lm, args, device)
        name = f"decode b={args.batch}, learn {'on' if args.learn else 'off'}" + (", compiled" if args.compile else "")
        settings = {"learn": args.learn, "compile": args.compile}
    with compiled_writes(args.what == "train" and not args.eager_writes, loops=args.compile_loops):
        for _ in range(3):  # compile and warm up
            step()
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
    kernels = kernel_table(prof, cuda)
    total_ms = sum(ms for _, ms in kernels.values())
    launches = sum(count for count, _ in kernels.values())
    rows = sorted(({"name": k, "count": count, "ms": round(ms, 3)} for k, (count, ms) in kernels.items()),
                  key=lambda row: -row["ms"])
    result = {"what": args.what, "preset": args.preset, "batch": args.batch, **settings,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
              "kernel_ms_total": round(total_ms, 3), "kernels": launches, "top": rows[:args.top]}
    save_section(RESULTS, name, result)
    print(f"{name} ({args.preset}, b={args.batch}): {launches} kernels, {total_ms:.2f} ms of kernel time")
    print(f"{'ms':>9} {'share':>6} {'count':>7}  kernel")
    for row in rows[:args.top]:
        print(f"{row['ms']:9.3f} {row['ms'] / total_ms:6.1%} {row['count']:7d}  {row['name']}")


if __name__ == "__main__":
    main()
