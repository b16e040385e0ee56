"""Float8 linear layers, measured as a lever on the sleep's and training's GEMMs: the forward's and
the input gradient's GEMMs in float8 (e4m3, one scale per row), the weight gradient's in bf16.

Why: on the H200 (bench/NOTES.md, session 18) a sleep step spends 57% of its time in GEMMs already
at ~90% of the bf16 rate, and float8 GEMMs ran ~1.65x faster. Per-tensor scales lost that to their
casts: a whole-tensor amax is a pass of its own before the cast, and the weight gradient needs
transposed float8 copies of the activations and gradients. One scale per row is a reduction over
the row the producing kernel already holds (a norm, the GELU, the GELU's backward), so compiled, the
cast can fuse into it; and the two GEMMs that take per-row scales without a transpose are the
forward (x @ W^T, rows of x and of W) and the input gradient (g @ W, rows of g and columns of W,
a weight-sized transpose). The weight gradient (g^T @ x, summed over the rows) would need per-column
scales of the activations, so it stays bf16 on the bf16 input the autocast path would save anyway.

Outcome (H200, session 19, bench/NOTES.md): the GEMMs got ~1.4x faster, but the kernels inductor
fused the quantization into (the GELU's and its backward's, two passes each over 3072-wide rows)
cost more than that saved: the compiled, graphed sleep step went from 69.7 to 80.9 ms. So this
lives in bench/, not in the model: `gpu_suite.py` times it (`shared_bulk compiled graphed float8`,
`reverie-graph-compiled-float8`), `ff_float8.py` isolates one layer, `kernel_profile.py --float8`.

`use_float8(model)` converts a model's mixer, feed-forward and working-memory linear layers in place
(as torchao's `convert_to_float8_training` does); the memories' own layers stay float32. Weights,
parameter names and state dicts are unchanged. Rounding to e4m3 costs ~3% per element against
bf16's ~0.4%.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
TINIEST_SCALE = 1e-12  # an all-zero row: any scale quantizes it to zeros


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t: (r, c) -> (e4m3 (r, c), float32 (r, 1)): each row scaled so its largest magnitude is
    e4m3's largest, and the scale that gives it back (t ~= q * scale)."""
    amax = t.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / E4M3_MAX).clamp(min=TINIEST_SCALE)
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """What F.linear would return here: autocast's dtype inside autocast, else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _Float8Matmul(torch.autograd.Function):
    """x (m, k) @ weight (n, k)^T -> (m, n) in `dtype`; float8 forward and input gradient, bf16
    weight gradient (the module docstring says why)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x_low = x.to(torch.bfloat16)
        xq, x_scale = quantize_rows(x_low)
        wq, w_scale = quantize_rows(weight)  # (n, k): B = wq^T is column-major, one scale per column
        ctx.save_for_backward(x_low, weight)
        return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x_low, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gq, g_scale = quantize_rows(grad.contiguous())
            wt_q, wt_scale = quantize_rows(weight.t().contiguous())  # (k, n): B = wt_q^T, a scale per k
            grad_x = torch._scaled_mm(gq, wt_q.t(), scale_a=g_scale, scale_b=wt_scale.t(), out_dtype=x_low.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad.to(torch.bfloat16).t() @ x_low).to(weight.dtype)
        return grad_x, grad_w, None


def float8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias) through float8 GEMMs. x: (..., k), weight: (n, k) -> (..., n)."""
    out = _Float8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, output_dtype(x))
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Float8Linear(nn.Linear):
    """An nn.Linear without bias whose GEMMs run in float8 (`float8_linear`); same parameter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float8_linear(x, self.weight)


def float8_ready(linear: nn.Linear) -> bool:
    """float8 GEMMs take no bias here, and want both dimensions multiples of 16."""
    return linear.bias is None and linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def use_float8(model: nn.Module) -> list[str]:
    """Make the linear layers of `model.autocast_matrices()` (a ReverieLM's mixers, feed-forwards
    and working memory) Float8Linear, in place; returns their names. Those of a shape float8 cannot
    take stay as they are. Calling it again changes nothing."""
    wanted = {id(p) for p in model.autocast_matrices().values()}
    converted = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and id(module.weight) in wanted and float8_ready(module):
            module.__class__ = Float8Linear
            converted.append(name)
        elif type(module) is Float8Linear:
            converted.append(name)
    return converted

