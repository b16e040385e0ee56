"""Training throughput of ReverieLM `base` against a same-size GPT, in one run, on one GPU.

Each variant runs in its own subprocess with a time limit, so a slow compile or an
out-of-memory error is recorded as such instead of ending the benchmark. Prints a table and
writes bench/results/train_throughput.json (and a copy under --out).

    python bench/train_throughput.py                 # on a CUDA machine
    python bench/train_throughput.py --quick         # tiny sizes, CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 datasheet figures used for MFU


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def measure(variant: str, batch: int, seq_len: int, steps: int, warmup: int, quick: bool) -> dict:
    """Run inside a subprocess: time `steps` optimizer steps after `warmup`."""
    import torch

    from bench.baselines import GPT
    from model.config import preset
    from model.lm import ReverieLM, bits_per_byte

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    if variant.startswith("gpt"):
        model = GPT(n_layers=2, d_model=64, n_heads=2) if quick else GPT()
        forward = lambda x: model(x)  # noqa: E731
        flops_per_token = model.flops_per_token(seq_len)
    else:
        config = preset("tiny" if quick else "base")
        model = ReverieLM(config)
        forward = lambda x: model(x)[0]  # noqa: E731
        n = sum(p.numel() for p in model.parameters())
        flops_per_token = 6 * n + 6 * config.d_model * config.window  # weights + one windowed attention
    model.to(device)
    params = sum(p.numel() for p in model.parameters())
    if variant.endswith("compile"):
        forward = torch.compile(forward)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = torch.randint(0, 256, (batch, seq_len + 1), device=device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = bits_per_byte(forward(data[:, :-1]), data[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    compile_started = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - compile_started
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    float(loss)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens_per_s = steps * batch * seq_len / seconds
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_flops(name)
    return {"params": params, "tokens_per_s": tokens_per_s, "step_ms": 1000 * seconds / steps,
            "warmup_s": warmup_s, "batch": batch, "seq_len": seq_len,
            "mfu": (flops_per_token * tokens_per_s / peak) if peak else None,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
            "device": name, "torch": torch.__version__}


def run_variant(variant: str, args) -> dict:
    """Measure one variant in a subprocess; fall back to half the batch on out-of-memory."""
    batch = args.batch
    while batch >= 1:
        command = [sys.executable, __file__, "--child", variant, "--batch", str(batch), "--seq-len",
                   str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        if args.quick:
            command.append("--quick")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.variant_timeout,
                                  cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.variant_timeout}s (compile or steps too slow)"}
        if done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
        if "out of memory" in done.stderr.lower() and batch > 1:
            batch //= 2
            continue
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return {"error": "out of memory at batch 1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default="gpt-compile,reverie-eager,reverie-compile")
    parser.add_argument("--variant-timeout", type=int, default=420)
    parser.add_argument("--quick", action="store_true", help="tiny models, for a CPU smoke run")
    parser.add_argument("--out", help="also copy the JSON into this directory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.seq_len, args.steps, args.warmup, args.quick)))
        return
    results = {}
    for variant in args.variants.split(","):
        print(f"measuring {variant} ...", flush=True)
        results[variant] = run_variant(variant, args)
        print(f"  {results[variant]}", flush=True)
    ok = {k: v for k, v in results.items() if "error" not in v}
    gpt = ok.get("gpt-compile") or ok.get("gpt-eager")
    reverie_best = max((v for k, v in ok.items() if k.startswith("reverie")), key=lambda v: v["tokens_per_s"],
                       default=None)
    summary = {
        "device": next((v["device"] for v in ok.values()), "unknown"),
        "reverie": reverie_best, "gpt": gpt, "variants": results,
        "ratio": (reverie_best["tokens_per_s"] / gpt["tokens_per_s"]) if reverie_best and gpt else None,
    }
    print(f"\n{'variant':<18}{'params':>12}{'batch':>7}{'bytes/s':>12}{'MFU':>7}{'step ms':>10}{'mem GB':>8}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<18} ERROR {r['error'][:80]}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
        print(f"{name:<18}{r['params']:>12,}{r['batch']:>7}{r['tokens_per_s']:>12,.0f}{mfu:>7}"
              f"{r['step_ms']:>10.1f}{mem:>8}")
    print(f"ratio reverie/gpt: {summary['ratio']}")
    text = json.dumps(summary, indent=2)
    target = ROOT / "bench" / "results" / ("train_throughput_quick.json" if args.quick else "train_throughput.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    if args.out:
        Path(args.out, target.name).write_text(text)


if __name__ == "__main__":
    main()
