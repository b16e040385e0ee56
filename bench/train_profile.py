"""Where a training step's GPU time goes: one ReverieLM step under torch.profiler, kernels grouped.

The graphed step (bench/gpu_suite.py) hides its kernels from the profiler; this runs the same
step eagerly (memory writes compiled, as `reverie-graph-compiled-writes` captures them) and sums
the GPU time of its kernels by name, so the next lever is chosen from a measurement. Prints the
top kernels and writes bench/results/train_profile.json.

    python bench/train_profile.py                       # base, b=16, T=2048, on the GPU
    python bench/train_profile.py --preset tiny --batch 2 --seq-len 128   # anywhere, CPU ops
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from model.config import preset  # noqa: E402
from model.lm import ReverieLM, bits_per_byte  # noqa: E402
from model.memory import compiled_writes  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "train_profile.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--eager-writes", action="store_true", help="profile the eager write instead of the compiled one")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    lm = ReverieLM(preset(args.preset)).to(device)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-4, fused=cuda)
    data = torch.randint(0, 256, (args.batch, args.seq_len + 1), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits, _ = lm(data[:, :-1])
            loss = bits_per_byte(logits, data[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with compiled_writes(not args.eager_writes):
        for _ in range(2):  # compile and warm up
            step()
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA if cuda else event.cpu_parent is None
        if on_device:
            entry = kernels[event.name[:90]]
            entry[0] += 1
            entry[1] += (event.device_time if cuda else event.cpu_time_total) / 1000.0
    total_ms = sum(ms for _, ms in kernels.values())
    launches = sum(count for count, _ in kernels.values())
    rows = sorted(({"name": name, "count": count, "ms": round(ms, 3)} for name, (count, ms) in kernels.items()),
                  key=lambda row: -row["ms"])
    result = {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len,
              "writes": "eager" if args.eager_writes else "compiled",
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
              "kernel_ms_total": round(total_ms, 2), "kernels": launches, "top": rows[:args.top]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.preset} b={args.batch} T={args.seq_len}, writes {result['writes']}: {launches} kernels, "
          f"{total_ms:.1f} ms of kernel time")
    print(f"{'ms':>9} {'share':>6} {'count':>7}  kernel")
    for row in rows[:args.top]:
        print(f"{row['ms']:9.2f} {row['ms'] / total_ms:6.1%} {row['count']:7d}  {row['name']}")


if __name__ == "__main__":
    main()
