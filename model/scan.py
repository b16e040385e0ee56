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
    from accelerated_scan.scalar import scan as _triton_scan
except ImportError:  # pragma: no cover - depends on the machine
    _triton_scan = None


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
    if a.is_cuda and _triton_scan is not None and a.dtype == torch.float32:
        return _fused_scan(a, b)
    return log_depth_scan(a, b)


@torch.compiler.disable  # an opaque Triton kernel with its own backward: torch.compile runs it as is
def _fused_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """accelerated-scan from a zero state. a, b: (batch, T, d) -> h: (batch, T, d)."""
    # The kernel wants (batch, channels, T) contiguous.
    return _triton_scan(a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous()).transpose(1, 2)


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
