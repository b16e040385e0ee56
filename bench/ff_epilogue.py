"""Would cuBLASLt's GELU epilogues make the feed-forward cheaper? One layer's FF, forward and
backward, at the training and sleep shapes, three ways:

    inductor   torch.compile of down(gelu(up(x))), as `ReverieLM.compile_layers` runs it now: the
               GEMMs are cuBLAS's, the GELU forward and backward are inductor's elementwise kernels
               (H200, session 17: 5.5 ms of a training step's 81 ms, at the copy bandwidth)
    epilogue   the up projection as one cuBLASLt GEMM that writes gelu(h) and h (GELU_AUX), and its
               gradient as one that writes (g @ W2) * gelu'(h) (DGELU): no elementwise kernels
    eager      the same sums in eager torch (tanh GELU), the reference

Each is checked against the float64 tanh-GELU sums (relative error of the output and every
gradient; inductor's runs the exact GELU, as the model does, so its error includes the two GELUs'
difference), then timed as a CUDA graph of forward + backward replayed (the suite's steps are
graphed; median of 50). Prints a table and writes bench/results/ff_epilogue.json.

    python bench/ff_epilogue.py          # CUDA only: builds bench/gelu_epilogue.cpp first (~1 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_suite import forward_backward_ms, rel_err  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ff_epilogue.json"
SHAPES = {"training 16x2048, sleep's student 128x256": 16 * 2048, "sleep's teacher 64x256": 64 * 256}


def build_extension():
    """Compile bench/gelu_epilogue.cpp against the cuBLASLt that torch loads (its pip package's
    headers and library where torch has them, else the CUDA toolkit's)."""
    from torch.utils.cpp_extension import load

    include, lib = [], []
    try:
        import nvidia.cublas as cublas
        base = Path(list(cublas.__path__)[0])
        if (base / "include" / "cublasLt.h").exists():
            include, lib = [str(base / "include")], [f"-L{base / 'lib'}"]
    except ImportError:
        pass
    return load(name="gelu_epilogue", sources=[str(ROOT / "bench" / "gelu_epilogue.cpp")], with_cuda=True,
                extra_include_paths=include, extra_ldflags=[*lib, "-lcublasLt", "-lcublas"], verbose=False)


class EpilogueFeedForward(torch.autograd.Function):
    """down(gelu(x @ up^T)) with the GELU inside the up projection's GEMM, forward and backward."""

    ext = None

    @staticmethod
    def forward(ctx, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        activated, pre = EpilogueFeedForward.ext.linear_gelu(x, up)
        ctx.save_for_backward(x, up, down, activated, pre)
        return activated @ down.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, up, down, activated, pre = ctx.saved_tensors
        grad = grad.contiguous()
        grad_down = grad.t() @ activated
        grad_pre = EpilogueFeedForward.ext.linear_gelu_backward(grad, down, pre)
        return grad_pre @ up, grad_pre.t() @ x, grad_down


def feed_forward(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return F.gelu(x @ up.t(), approximate=approximate) @ down.t()


def check(fn: Callable, x, up, down) -> dict[str, float]:
    """Relative errors of fn's output and gradients against the float64 tanh-GELU reference."""
    grad = torch.randn(x.shape[0], down.shape[0], device=x.device, dtype=x.dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, up, down)]
    out = fn(*leaves)
    out.backward(grad)
    wide = [t.detach().double().requires_grad_() for t in (x, up, down)]
    ref = feed_forward(*wide)
    ref.backward(grad.double())
    return {name: rel_err(got, want) for name, got, want in
            zip(("out", "grad_x", "grad_up", "grad_down"), [out, *(t.grad for t in leaves)], [ref, *(t.grad for t in wide)])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--ff-mult", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ff_epilogue needs CUDA: cuBLASLt's epilogues have no CPU path")
    started = time.perf_counter()
    EpilogueFeedForward.ext = build_extension()
    print(f"built the extension in {time.perf_counter() - started:.0f} s", flush=True)
    d, hidden = args.d_model, args.ff_mult * args.d_model
    g = torch.Generator(device="cuda").manual_seed(0)
    up = (torch.randn(hidden, d, device="cuda", generator=g) * d ** -0.5).bfloat16()
    down = (torch.randn(d, hidden, device="cuda", generator=g) * hidden ** -0.5).bfloat16()
    ways = {"eager": feed_forward, "inductor": torch.compile(lambda x, u, w: feed_forward(x, u, w, "none")),
            "epilogue": EpilogueFeedForward.apply}
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "d_model": d,
                     "hidden": hidden, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "shapes": {}}
    small = torch.randn(512, d, device="cuda", generator=g).bfloat16()
    results["errors_vs_float64_tanh"] = {name: check(fn, small, up, down) for name, fn in ways.items()}
    print(json.dumps(results["errors_vs_float64_tanh"], indent=1), flush=True)
    print(f"{'shape':<24} {'rows':>7} " + " ".join(f"{name + ' ms':>12}" for name in ways) + "   saved/layer")
    for label, rows in SHAPES.items():
        x = torch.randn(rows, d, device="cuda", generator=g).bfloat16()
        grad = torch.randn(rows, d, device="cuda", generator=g).bfloat16()
        times = {name: forward_backward_ms(fn, [x, up, down], grad) for name, fn in ways.items()}
        results["shapes"][label] = {"rows": rows, **{f"{name}_ms": t for name, t in times.items()}}
        print(f"{label:<24} {rows:>7} " + " ".join(f"{t:12.3f}" for t in times.values())
              + f"   {times['inductor'] - times['epilogue']:+.3f} ms", flush=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
