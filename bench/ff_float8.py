"""Where float8 loses in a compiled feed-forward: one `base` layer's RMSNorm -> up -> GELU -> down,
forward + backward at 32,768 rows (the sleep's student rows), compiled, bf16 (autocast) against
bench/float8_rowwise.py's per-row float8 GEMMs, each as one CUDA graph replayed (median of 50).

Why: in the sleep's step (bench/NOTES.md, session 19) float8 made the GEMMs ~1.4x faster but the
kernels inductor fused the per-row quantization into (the GELU's, the GELU backward's) ran at 2-3x
their bf16 time, so the step got slower. This isolates one layer, so a fix can be measured in
seconds, and with --code DIR writes the Triton code inductor generated for both, to read why.
Prints a table and writes bench/results/ff_float8.json.

    python bench/ff_float8.py --code /tmp/ff_code      # CUDA with float8 (sm_89 or newer) only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_suite import forward_backward_ms, rel_err  # noqa: E402
from model.config import preset  # noqa: E402
from bench.float8_rowwise import use_float8  # noqa: E402
from model.layers import RMSNorm, feed_forward  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ff_float8.json"


class NormedFeedForward(torch.nn.Module):
    """x + ff(norm(x)): the part of `Layer.feed` the GEMMs and their quantization live in."""

    def __init__(self) -> None:
        super().__init__()
        config = preset("base")
        self.norm, self.ff = RMSNorm(config.d_model), feed_forward(config)
        self.autocast_matrices = lambda: {name: p for name, p in self.ff.named_parameters()}  # what use_float8 reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return x + self.ff(self.norm(x))


def layer(float8: bool) -> NormedFeedForward:
    torch.manual_seed(0)
    module = NormedFeedForward().cuda()
    if float8:
        use_float8(module)
    return module


def compiled_code(module: NormedFeedForward, x: torch.Tensor, grad: torch.Tensor) -> str:
    """The Triton code inductor writes for the module's forward and backward."""
    from torch._inductor.utils import run_and_get_code

    def step() -> None:
        module(x.detach().requires_grad_()).backward(grad)
    _, code = run_and_get_code(torch.compile(step))
    return "\n\n".join(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32_768)
    parser.add_argument("--code", type=Path, help="write inductor's generated code of each variant here")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        sys.exit("ff_float8 needs a CUDA GPU with float8 GEMMs (sm_89 or newer)")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.rows, 768, device="cuda", generator=g).bfloat16()
    grad = torch.randn(args.rows, 768, device="cuda", generator=g).bfloat16()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": args.rows,
                     "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "variants": {}}
    outputs = {}
    print(f"{'variant':<10} {'ms':>8}")
    for name, float8 in (("bf16", False), ("float8", True)):
        module = layer(float8)
        if args.code:
            args.code.mkdir(parents=True, exist_ok=True)
            (args.code / f"{name}.py").write_text(compiled_code(layer(float8), x, grad))
        fn = torch.compile(lambda t, m=module: m(t))
        ms = forward_backward_ms(fn, [x], grad)
        outputs[name] = fn(x[:4096]).float()
        results["variants"][name] = {"ms": ms}
        print(f"{name:<10} {ms:8.3f}", flush=True)
    results["float8_vs_bf16_out_rel_err"] = rel_err(outputs["float8"], outputs["bf16"])
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"float8 / bf16 time {results['variants']['float8']['ms'] / results['variants']['bf16']['ms']:.2f}, "
          f"output rel err {results['float8_vs_bf16_out_rel_err']:.1e}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
