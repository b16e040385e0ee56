"""The affine diagonal recurrence h_t = a_t * h_{t-1} + b_t, parallel and sequential.

`affine_scan` is the one entry point the model uses. On CUDA, for float32 and with Triton
installed, it runs our Triton kernels (model/scan_kernel.py); otherwise a log-depth (Hillis-Steele)
scan in plain torch, exact up to rounding, causal by construction and traceable by torch.compile.
`affine_scan_reference` is the readable per-step loop that the tests compare both against.

Why our own kernels rather than a package's (accelerated-scan, which this replaced): they read
and write the model's (batch, T, d) layout with any strides, so no transposed copies of a, b, h
or the output gradient (2.8 ms a training step on an H200 for the gradient alone); and they walk
T in chunks, where accelerated-scan's fixed 2048-wide block wasted 7/8 of its work at the sleep's
T=256. Under TRITON_INTERPRET=1, `triton_scan` runs the kernels on CPU tensors: that is how the
tests check them on machines without a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.kernels import kernels_available, triton_kernels

# Tiles for d=768, T=256..2048, batch 16..192 on an H100/H200. 32 float32 channels are one 128-byte
# segment of a time row, so each row of a tile is one coalesced access, and at batch 16 the grid
# still has 16 * 768 / 32 = 384 programs (~3 per SM) to keep loads in flight; 64 rows a chunk give
# 4 warps 16 elements a thread per tensor, and T=256 only 4 chunks. On an H200 (triton 3.6) this is
# within 11% of the best of 3 x 3 x 4 tilings at each of (batch, T) = (16, 2048), (192, 256),
# (64, 256), (32, 512), and at 63-81% of the copy bandwidth: e.g. (192, 256) forward 0.13 ms,
# backward 0.22 ms, where the log-depth torch scan takes 13.7 ms for both.
BLOCK_T, BLOCK_D, NUM_WARPS = 64, 32, 4
# The gated kernels (`gated_scan`) walk each channel through time in a thread, two channels a thread
# (GATED_BLOCK_D over 4 warps), loading a chunk of steps at once: 16 forward, 8 backward (whose
# steps load 5 tensors, not 3). A grid of fewer than GATED_MIN_PROGRAMS programs (a batch of 16 rows
# has 16 * 768 channels, 48 programs) is split into segments of time until it has GATED_PROGRAMS,
# at the cost of a summary pass; a larger one runs unsplit. H200, session 16, the kernels alone
# (bench/NOTES.md): the sleep's 128 x 256 0.08 ms forward, 0.13 backward, unsplit; training's
# 16 x 2048 0.11 / 0.20 in 22 segments, against 0.29 / 0.46 unsplit (one channel a thread).
GATED_FORWARD_BLOCK_T, GATED_BACKWARD_BLOCK_T, GATED_BLOCK_D = 16, 8, 256
GATED_MIN_PROGRAMS, GATED_PROGRAMS = 384, 1024


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
    if a.is_cuda and a.dtype == b.dtype == torch.float32 and fused_scan_available():
        return _opaque_triton_scan(a, b)
    return log_depth_scan(a, b)


def fused_scan_available() -> bool:
    """Whether float32 CUDA scans run the Triton kernels: Triton is installed (a constant to
    torch.compile, through `kernels_available`)."""
    return kernels_available("model.scan_kernel")


@torch.compiler.disable  # an opaque Triton kernel with its own backward: torch.compile runs it as is
def _opaque_triton_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return triton_scan(a, b)


def triton_scan(a: torch.Tensor, b: torch.Tensor, block_t: int = BLOCK_T, block_d: int = BLOCK_D) -> torch.Tensor:
    """The Triton scan from a zero state, differentiable. a, b: (batch, T, d) float32, any strides
    -> h: (batch, T, d), contiguous. CUDA tensors, or CPU ones under TRITON_INTERPRET=1; the tile
    sizes are arguments so that tests can cover several chunks with small tensors."""
    return _TritonScan.apply(a, b, block_t, block_d)


class _TritonScan(torch.autograd.Function):
    """model/scan_kernel.py's kernels. Saves a and h (the output) and nothing else."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, block_t: int, block_d: int) -> torch.Tensor:
        batch, length, d = a.shape
        h = torch.empty(batch, length, d, dtype=torch.float32, device=a.device)
        kernels = triton_kernels("model.scan_kernel")
        kernels.forward_kernel[(batch, -(-d // block_d))](a, b, h, *a.stride(), *b.stride(), length, d,
                                                          BLOCK_T=block_t, BLOCK_D=block_d, num_warps=NUM_WARPS)
        ctx.save_for_backward(a, h)
        ctx.blocks = block_t, block_d
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        a, h = ctx.saved_tensors
        block_t, block_d = ctx.blocks
        batch, length, d = a.shape
        da, db = torch.empty_like(h), torch.empty_like(h)
        kernels = triton_kernels("model.scan_kernel")
        kernels.backward_kernel[(batch, -(-d // block_d))](a, h, dh, da, db, *a.stride(), *dh.stride(), length, d,
                                                           BLOCK_T=block_t, BLOCK_D=block_d, num_warps=NUM_WARPS)
        return da, db, None, None


def gated_scan(proj: torch.Tensor, bias: torch.Tensor, h0: torch.Tensor, sign: int, block_t: int | None = None,
               block_d: int = GATED_BLOCK_D, num_warps: int = NUM_WARPS, segments: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixer's gates, scan and output gate as one Triton pass each way (`gated_scan_reference`
    is what it computes). proj: (batch, T, 3d), the input projection (gate pre-activation, input,
    output gate), any strides; bias: (d,) the gate's; h0: (batch, d); sign: +1 for a = sigmoid(z),
    -1 for a = exp(-softplus(z)) = sigmoid(-z). -> out (batch, T, d) in proj's dtype, h_{T-1}
    (batch, d) float32. CUDA tensors, or CPU ones under TRITON_INTERPRET=1; the tiles (block_t None:
    each direction's own) and the segments of time (None: `gated_segments`) are arguments for the
    tests' small shapes (bench/gpu_suite.py sweeps them on `gated_scan_forward` and
    `gated_scan_backward`, the kernels alone).

    Why: unfused, the gates and the output gate are elementwise kernels around the scan that write
    and read a, (1 - a) x and h in float32, ~32 bytes an element forward where this reads proj and
    writes out and, for the backward, h (10 at bf16). Until session 16 the kernels scanned a
    (steps x channels) tile with `tl.associative_scan` and kept h only at chunk starts: they ran at
    0.5-1.2 TB/s on an H200 (bench/NOTES.md), bound by the scan's instructions, not its bytes.
    """
    return _GatedScan.apply(proj, bias, h0, sign, (block_t, block_d, num_warps, segments))


def gated_segments(batch: int, length: int, d: int, block_t: int, block_d: int, segments: int | None = None
                   ) -> tuple[int, int]:
    """(segments, steps a segment): time cut into whole chunks of block_t steps, as many segments as
    asked, or (None) one for a grid of GATED_MIN_PROGRAMS programs or more, else as many as bring
    it to GATED_PROGRAMS."""
    chunks = -(-length // block_t)
    programs = batch * -(-d // block_d)
    if segments is None:
        segments = 1 if programs >= GATED_MIN_PROGRAMS else -(-GATED_PROGRAMS // programs)
    per_segment = -(-chunks // max(1, min(segments, chunks)))
    return -(-chunks // per_segment), per_segment * block_t


def gated_scan_reference(proj: torch.Tensor, bias: torch.Tensor, h0: torch.Tensor, sign: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`gated_scan` in torch: a = sigmoid(sign * (z + bias)), h = scan(a, (1 - a) x) from h0, out =
    h * silu(o), with the gate and scan math in float32 (or wider)."""
    z, x, o = proj.chunk(3, dim=-1)
    wide = torch.promote_types(proj.dtype, torch.float32)
    a = torch.sigmoid(sign * (z.to(wide) + bias))
    h = affine_scan(a, (1.0 - a) * x.to(wide), h0.to(wide))
    return h.to(proj.dtype) * F.silu(o), h[:, -1]


@torch.compiler.disable  # opaque Triton kernels with their own backward: torch.compile runs them as they are
def opaque_gated_scan(proj: torch.Tensor, bias: torch.Tensor, h0: torch.Tensor, sign: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_scan(proj, bias, h0, sign)


class _GatedScan(torch.autograd.Function):
    """model/scan_kernel.py's gated kernels. Saves proj and h (in proj's dtype) when a gradient is wanted."""

    @staticmethod
    def forward(ctx, proj: torch.Tensor, bias: torch.Tensor, h0: torch.Tensor, sign: int,
                tiles: tuple[int, int, int, int | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """tiles: block_t (None: each direction's), block_d, num_warps, segments (`gated_scan`'s)."""
        batch, length, width = proj.shape
        d = width // 3
        if width != 3 * d or bias.shape != (d,) or h0.shape != (batch, d):
            raise ValueError(f"gated_scan expects proj (batch, T, 3d), bias (d,) and h0 (batch, d); got proj "
                             f"{tuple(proj.shape)}, bias {tuple(bias.shape)}, h0 {tuple(h0.shape)}")
        bias32 = bias.float().contiguous()
        backward = any(ctx.needs_input_grad[:3])
        block_t, *rest = tiles
        out, h_last, h = gated_scan_forward(proj, bias32, h0.float().contiguous(), sign,
                                            block_t or GATED_FORWARD_BLOCK_T, *rest, store_h=backward)
        if backward:
            ctx.save_for_backward(proj, bias32, h)
        ctx.settings = sign, tiles, bias.dtype, h0.dtype
        return out, h_last

    @staticmethod
    def backward(ctx, d_out: torch.Tensor, d_last: torch.Tensor):
        proj, bias32, h = ctx.saved_tensors
        sign, tiles, bias_dtype, h0_dtype = ctx.settings
        block_t, *rest = tiles
        d_proj, d_bias, d_h0 = gated_scan_backward(proj, bias32, h, d_out, d_last.float().contiguous(), sign,
                                                   block_t or GATED_BACKWARD_BLOCK_T, *rest)
        return d_proj, d_bias.to(bias_dtype), d_h0.to(h0_dtype), None, None


def gated_scan_forward(proj: torch.Tensor, bias: torch.Tensor, h0: torch.Tensor, sign: int, block_t: int,
                       block_d: int, num_warps: int, segments: int | None = None, store_h: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The forward kernels' launches (bias, h0: float32, contiguous) -> out, h_last, h (None unless
    store_h). Apart from the autograd function so that bench/gpu_suite.py can time the kernels alone."""
    batch, length, width = proj.shape
    d = width // 3
    n_segments, segment_len = gated_segments(batch, length, d, block_t, block_d, segments)
    kernels = triton_kernels("model.scan_kernel")
    out = torch.empty(batch, length, d, dtype=proj.dtype, device=proj.device)
    h = torch.empty(batch, length, d, dtype=proj.dtype, device=proj.device) if store_h else out
    h_last = torch.empty(batch, d, dtype=torch.float32, device=proj.device)
    summary = torch.empty(batch, n_segments, 2, d, dtype=torch.float32, device=proj.device)
    blocks = -(-d // block_d)
    if n_segments > 1:
        kernels.gated_summary_kernel[(batch, blocks, n_segments - 1)](
            proj, bias, summary, *proj.stride(), length, d, segment_len, n_segments,
            SIGN=sign, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
    kernels.gated_forward_kernel[(batch, blocks, n_segments)](
        proj, bias, h0, out, h, h_last, summary, *proj.stride(), length, d, segment_len, n_segments,
        STORE_H=store_h, SIGN=sign, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
    return out, h_last, h if store_h else None


def gated_scan_backward(proj: torch.Tensor, bias: torch.Tensor, h: torch.Tensor, d_out: torch.Tensor,
                        d_last: torch.Tensor, sign: int, block_t: int, block_d: int, num_warps: int,
                        segments: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernels' launches (d_last: float32, contiguous; h: the forward's) -> d_proj,
    d_bias (d,), d_h0."""
    batch, length, width = proj.shape
    d = width // 3
    n_segments, segment_len = gated_segments(batch, length, d, block_t, block_d, segments)
    kernels = triton_kernels("model.scan_kernel")
    d_proj = torch.empty(batch, length, width, dtype=proj.dtype, device=proj.device)
    d_bias = torch.empty(batch, n_segments, d, dtype=torch.float32, device=proj.device)
    d_h0 = torch.empty(batch, d, dtype=torch.float32, device=proj.device)
    summary = torch.empty(batch, n_segments, 2, d, dtype=torch.float32, device=proj.device)
    blocks = -(-d // block_d)
    if n_segments > 1:
        kernels.gated_backward_summary_kernel[(batch, blocks, n_segments - 1)](
            proj, bias, d_out, summary, *proj.stride(), *d_out.stride(), length, d, segment_len, n_segments,
            SIGN=sign, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
    kernels.gated_backward_kernel[(batch, blocks, n_segments)](
        proj, bias, h, d_out, d_last, d_proj, d_bias, d_h0, summary, *proj.stride(), *d_out.stride(), length, d,
        segment_len, n_segments, SIGN=sign, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
    return d_proj, d_bias.sum((0, 1)), d_h0


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
