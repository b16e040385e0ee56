"""The affine diagonal recurrence h_t = a_t * h_{t-1} + b_t, parallel and sequential.

`affine_scan` is the one entry point the model uses. It runs a log-depth (Hillis-Steele) scan in
plain torch, which is exact up to rounding, causal by construction and traceable by torch.compile.
`affine_scan_reference` is the readable per-step loop that the tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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

    Composes the affine maps (a, b) pairwise at doubling offsets: after the pass at offset k,
    (a_t, b_t) is the composition of the maps t-2k+1..t. log2(T) passes of elementwise work; no
    division, so gates near zero stay stable. The carry h0 is folded in as b_0 += a_0 * h0.
    """
    if a.shape != b.shape or a.dim() != 3 or h0.shape != (a.shape[0], a.shape[2]):
        raise ValueError(f"affine_scan expects a, b: (batch, T, d) and h0: (batch, d); "
                         f"got a {tuple(a.shape)}, b {tuple(b.shape)}, h0 {tuple(h0.shape)}")
    b = torch.cat([b[:, :1] + a[:, :1] * h0[:, None], b[:, 1:]], dim=1)
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
