"""Would float8 GEMMs make the sleep's and training's steps cheaper? One linear layer's forward
and backward at `base`'s shapes and 32,768 rows (training 16 x 2048, the sleep's student rows),
in bf16 (what runs now: cuBLAS through autocast) and in float8 with per-tensor dynamic scales
(`torch._scaled_mm`: inputs and weights e4m3, gradients e5m2, outputs bf16; the scales' amax
reductions and the casts compiled, the transposes the backward's layouts need included), each
timed as one CUDA graph of forward + backward replayed (median of 50).

Why: the H200 profile of the sleep's step (bench/NOTES.md, session 18) has its GEMMs at 55% of the
step and ~89% of the bf16 rate, and Hopper's float8 rate is twice bf16's. This measures what is
left of that once the casts are paid, and the rounding it costs, before any model code uses it.
Prints a table and writes bench/results/fp8_linear.json.

    python bench/fp8_linear.py          # CUDA with float8 (sm_89 or newer) only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_suite import forward_backward_ms, rel_err  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fp8_linear.json"
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# (in, out) of base's linear layers: the mixer's in and out projections, the feed-forward's up and down.
SHAPES = {"mixer in 768->2304": (768, 2304), "mixer out 768->768": (768, 768),
          "ff up 768->3072": (768, 3072), "ff down 3072->768": (3072, 768)}


@torch.compile
def quantize(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """t scaled so its largest magnitude is dtype's largest, cast; and the inverse scale."""
    top = torch.finfo(dtype).max
    amax = t.abs().amax().float().clamp(min=1e-12)
    scale = top / amax
    return (t.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix, its memory column-major (what `_scaled_mm` wants of its second operand)."""
    return t.t().contiguous().t()


class Float8Linear(torch.autograd.Function):
    """x @ w^T with both GEMMs of the backward in float8 too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize(x, E4M3)
        wq, ws = quantize(w, E4M3)
        ctx.save_for_backward(xq, xs, wq, ws)
        return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xq, xs, wq, ws = ctx.saved_tensors
        gq, gs = quantize(grad.contiguous(), E5M2)
        grad_x = torch._scaled_mm(gq, column_major(wq), scale_a=gs, scale_b=ws, out_dtype=torch.bfloat16)
        grad_w = torch._scaled_mm(gq.t().contiguous(), column_major(xq), scale_a=gs, scale_b=xs,
                                  out_dtype=torch.bfloat16)
        return grad_x, grad_w


def bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.t()


def errors(fn: Callable, x: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    """Relative errors of the output and both gradients against float64."""
    grad = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    out = fn(*leaves)
    out.backward(grad)
    wide = [t.detach().double().requires_grad_() for t in (x, w)]
    ref = wide[0] @ wide[1].t()
    ref.backward(grad.double())
    return {"out": rel_err(out, ref), "grad_x": rel_err(leaves[0].grad, wide[0].grad),
            "grad_w": rel_err(leaves[1].grad, wide[1].grad)}


def profile(rows: int) -> None:
    """Where the float8 layer's time goes: its kernels, by GPU time, for the FF's up projection."""
    w = torch.randn(3072, 768, device="cuda").bfloat16().requires_grad_()
    x = torch.randn(rows, 768, device="cuda").bfloat16().requires_grad_()
    grad = torch.randn(rows, 3072, device="cuda").bfloat16()
    for _ in range(3):
        Float8Linear.apply(x, w).backward(grad)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            Float8Linear.apply(x, w).backward(grad)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=90))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16 * 2048)
    parser.add_argument("--profile", action="store_true",
                        help="also print the kernels of the float8 forward + backward of the FF's up projection")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        sys.exit("fp8_linear needs a CUDA GPU with float8 GEMMs (sm_89 or newer)")
    g = torch.Generator(device="cuda").manual_seed(0)
    if args.profile:
        profile(args.rows)
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": args.rows,
                     "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "shapes": {}}
    print(f"{'layer':<22} {'bf16 ms':>8} {'fp8 ms':>8} {'speed-up':>8}  fp8 errors (out, grad_x, grad_w)")
    for label, (fan_in, fan_out) in SHAPES.items():
        w = (torch.randn(fan_out, fan_in, device="cuda", generator=g) * fan_in ** -0.5).bfloat16()
        x = torch.randn(args.rows, fan_in, device="cuda", generator=g).bfloat16()
        small = x[:1024]
        errs = {"bf16": errors(bf16_linear, small, w), "fp8": errors(Float8Linear.apply, small, w)}
        grad = torch.randn(args.rows, fan_out, device="cuda", generator=g).bfloat16()
        times = {"bf16": forward_backward_ms(bf16_linear, [x, w], grad),
                 "fp8": forward_backward_ms(Float8Linear.apply, [x, w], grad)}
        flop = 6 * args.rows * fan_in * fan_out
        results["shapes"][label] = {"bf16_ms": times["bf16"], "fp8_ms": times["fp8"],
                                    "bf16_tflops": flop / times["bf16"] / 1e9, "fp8_tflops": flop / times["fp8"] / 1e9,
                                    "errors": errs}
        e = errs["fp8"]
        print(f"{label:<22} {times['bf16']:8.3f} {times['fp8']:8.3f} {times['bf16'] / times['fp8']:7.2f}x  "
              f"{e['out']:.1e} {e['grad_x']:.1e} {e['grad_w']:.1e} (bf16 {errs['bf16']['out']:.1e})", flush=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
