"""The Triton programs behind `model.scan.triton_scan` (imported only where Triton is installed).

Both work in the model's (batch, T, d) layout, with any input strides. One program owns one batch
row and BLOCK_D contiguous channels (one coalesced segment of each time row) and walks T in chunks
of BLOCK_T rows: an associative scan of the affine maps inside a chunk, then the carry from the
chunk before. `forward_kernel` stores h; `backward_kernel` runs the same scan backwards in time on
the output gradient and needs h, the forward's output, for d_a. Compiled for CUDA; with
TRITON_INTERPRET=1 set before Triton is imported (tests/conftest.py), Triton's interpreter runs
them on CPU tensors.
"""

import triton
import triton.language as tl


@triton.jit
def _compose(a1, b1, a2, b2):
    """The map x -> a2 * (a1 * x + b1) + b2: map 1, then map 2 (in a reverse scan, map 1 is the later step)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def forward_kernel(a, b, h, sa_b, sa_t, sa_d, sb_b, sb_t, sb_d, length, d,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """h_t = a_t * h_{t-1} + b_t from h_{-1} = 0. a, b: (batch, T, d), any strides; h: the same,
    contiguous. Rows past T are the identity map, so the last row of a chunk is its last valid h."""
    row = tl.program_id(0).to(tl.int64)
    channel = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    step = tl.arange(0, BLOCK_T)
    a += row * sa_b + channel[None, :] * sa_d
    b += row * sb_b + channel[None, :] * sb_d
    h += row * length * d + channel[None, :]
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, length, BLOCK_T):
        t = start + step[:, None]
        inside = (t < length) & (channel[None, :] < d)
        a_t = tl.load(a + t * sa_t, mask=inside, other=1.0)
        b_t = tl.load(b + t * sb_t, mask=inside, other=0.0)
        a_cum, b_cum = tl.associative_scan((a_t, b_t), 0, _compose)
        h_t = a_cum * carry[None, :] + b_cum
        tl.store(h + t * d, h_t, mask=inside)
        carry = tl.sum(tl.where(step[:, None] == BLOCK_T - 1, h_t, 0.0), axis=0)


@triton.jit
def backward_kernel(a, h, dh, da, db, sa_b, sa_t, sa_d, sdh_b, sdh_t, sdh_d, length, d,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The gradient of `forward_kernel`. g_t = dh_t + a_{t+1} * g_{t+1} (a_T = 0), scanned from the
    end; db_t = g_t, da_t = g_t * h_{t-1} (h_{-1} = 0). a: (batch, T, d) and dh, any strides; h, da,
    db: contiguous. The carry into a chunk is g at the first row of the chunk after it."""
    row = tl.program_id(0).to(tl.int64)
    channel = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    step = tl.arange(0, BLOCK_T)
    a += row * sa_b + channel[None, :] * sa_d
    dh += row * sdh_b + channel[None, :] * sdh_d
    contiguous = row * length * d + channel[None, :]
    h += contiguous
    da += contiguous
    db += contiguous
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    for chunk in range(tl.cdiv(length, BLOCK_T) - 1, -1, -1):
        t = chunk * BLOCK_T + step[:, None]
        in_d = channel[None, :] < d
        inside = (t < length) & in_d
        a_next = tl.load(a + (t + 1) * sa_t, mask=(t + 1 < length) & in_d, other=0.0)
        dh_t = tl.load(dh + t * sdh_t, mask=inside, other=0.0)
        a_cum, g_cum = tl.associative_scan((a_next, dh_t), 0, _compose, reverse=True)
        g = a_cum * carry[None, :] + g_cum
        h_prev = tl.load(h + (t - 1) * d, mask=(t >= 1) & inside, other=0.0)
        tl.store(db + t * d, g, mask=inside)
        tl.store(da + t * d, g * h_prev, mask=inside)
        carry = tl.sum(tl.where(step[:, None] == 0, g, 0.0), axis=0)
