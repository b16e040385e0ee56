"""The affine diagonal recurrence h_t = a_t * h_{t-1} + b_t, parallel and sequential.

`affine_scan` is the one entry point the model uses. On CUDA, when the optional `accelerated-scan`
package (pure Triton; `pip install reverie[gpu]`) is present, it runs that fused kernel; otherwise
a log-depth (Hillis-Steele) scan in plain torch, exact up to rounding, causal by construction and
traceable by torch.compile. `affine_scan_reference` is the readable per-step loop that the tests
compare both against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # the GPU fast path is optional: CPU machines (tests, CI) have no Triton
    from accelerated_scan.scalar import backward_scan as _triton_backward
    from accelerated_scan.scalar import forward_scan as _triton_forward
except ImportError:  # pragma: no cover - depends on the machine
    _triton_forward = _triton_backward = None

# accelerated-scan 0.3.1's backward kernel reads `states[t - 1]` masked only by t > 0, so the lanes
# of its 2048-wide block past the sequence's end (T < 2048, or T not a multiple of 2048) read up to
# 2047 elements beyond the last sequence: an illegal memory access when `states` ends a CUDA
# allocation (compute-sanitizer on an H200, batch 32 x 768 x 512; bench/NOTES.md). Allocating
# `states` with that much slack keeps the over-read in bounds; the values read are never used.
_KERNEL_BLOCK = 2048


def affine_scan_reference(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Sequential reference. a, b: (batch, T, d); h0: (batch, d) -> h: (batch, T, d)."""
    h = h0
    outputs = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        outputs.append(h)
    return torch.stack(outputs, dim=1)


def affine_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Parallel scan. a, b: (batch, T, d); h0: (batch, d) -> h: (batch, T, d).

    The carry h0 is folded in as b_0 += a_0 * h0, so both paths scan from a zero state.
    """
    if a.shape != b.shape or a.dim() != 3 or h0.shape != (a.shape[0], a.shape[2]):
        raise ValueError(f"affine_scan expects a, b: (batch, T, d) and h0: (batch, d); "
                         f"got a {tuple(a.shape)}, b {tuple(b.shape)}, h0 {tuple(h0.shape)}")
    b = torch.cat([b[:, :1] + a[:, :1] * h0[:, None], b[:, 1:]], dim=1)
    if a.shape[1] == 1:  # one byte per user (decoding): h_0 = a_0 * h0 + b_0 is already done
        return b
    if a.is_cuda and _triton_forward is not None and a.dtype == torch.float32:
        # The kernels want (batch, channels, T) contiguous. Transposed here, outside the compiler-
        # disabled call, so a compiled caller writes a and b in that layout from the kernel that
        # makes them instead of copying them eagerly (2 copies of (b, T, d) a layer).
        return _fused_scan(a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous()).transpose(1, 2)
    return log_depth_scan(a, b)


@torch.compiler.disable  # an opaque Triton kernel with its own backward: torch.compile runs it as is
def _fused_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """accelerated-scan from a zero state. a, b: (batch, d, T), contiguous -> h: (batch, d, T)."""
    return _FusedScan.apply(a, b)


class _FusedScan(torch.autograd.Function):
    """accelerated-scan's forward and backward kernels, with `states` allocated with slack (above)."""

    @staticmethod
    def forward(ctx, forget: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        batch, channels, length = forget.shape
        states = torch.empty(forget.numel() + _KERNEL_BLOCK, device=forget.device, dtype=forget.dtype)
        states = states[:forget.numel()].view(batch, channels, length)
        _triton_forward[(batch, channels)](forget, inputs, states, seqlen=length, enable_fp_fusion=False)
        ctx.save_for_backward(forget, states)
        return states

    @staticmethod
    def backward(ctx, d_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        forget, states = ctx.saved_tensors
        batch, channels, length = forget.shape
        d_forget, d_inputs = torch.empty_like(forget), torch.empty_like(states)
        _triton_backward[(batch, channels)](forget, states, d_output.contiguous(), d_inputs, d_forget,
                                            seqlen=length, enable_fp_fusion=False)
        return d_forget, d_inputs


def log_depth_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hillis-Steele scan from a zero state. a, b: (batch, T, d) -> h: (batch, T, d).

    Composes the affine maps (a, b) pairwise at doubling offsets: after the pass at offset k,
    (a_t, b_t) is the composition of the maps t-2k+1..t. log2(T) passes of elementwise work; no
    division, so gates near zero stay stable.
    """
    length = a.shape[1]
    offset = 1
    while offset < length:
        # Shift right by `offset` along time; the identity map (a=1, b=0) fills the gap.
        a_prev = F.pad(a[:, :-offset], (0, 0, offset, 0), value=1.0)
        b_prev = F.pad(b[:, :-offset], (0, 0, offset, 0), value=0.0)
        b = a * b_prev + b
        a = a * a_prev
        offset *= 2
    return b
