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


@triton.jit
def _sigmoid(x):
    """1 / (1 + e^-x) with the fast division (not IEEE-rounded): the precise one is a long
    instruction sequence, for a gate that float32 rounding already limits."""
    return tl.fdiv(1.0, 1.0 + tl.exp(-x))


@triton.jit
def _gated_tile(proj, bias, sp_b, sp_d, d, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """A gated program's batch row, its BLOCK_D channels (and which are inside d), the steps of a
    chunk, the pointers to its channels' gate pre-activations in proj (x and o follow at d and 2d
    channels) and its channels' gate biases (1, BLOCK_D)."""
    row = tl.program_id(0).to(tl.int64)
    channel = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = channel < d
    bias_c = tl.load(bias + channel, mask=in_d, other=0.0)[None, :]
    return row, channel, tl.arange(0, BLOCK_T), in_d, proj + row * sp_b + channel[None, :] * sp_d, bias_c


@triton.jit
def gated_forward_kernel(proj, bias, h0, out, h_last, checkpoints, sp_b, sp_t, sp_d, length, d,
                         SIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The mixer from its input projection to its output gate, in one pass (`model.scan.gated_scan`):
    proj (batch, T, 3d), any strides, holds each step's gate pre-activation z, input x and output
    gate o; a = sigmoid(SIGN * (z + bias)), h_t = a * h_{t-1} + (1 - a) * x from h0 (batch, d), and
    out = h * silu(o) (batch, T, d) in proj's dtype. Also stores h_last = h_{T-1} and each chunk's
    incoming h (checkpoints, (batch, chunks, d)), from which the backward recomputes h."""
    row, channel, step, in_d, gate, bias_c = _gated_tile(proj, bias, sp_b, sp_d, d, BLOCK_T, BLOCK_D)
    carry = tl.load(h0 + row * d + channel, mask=in_d, other=0.0)
    out += row * length * d + channel[None, :]
    checkpoints += row * tl.cdiv(length, BLOCK_T) * d + channel
    for start in range(0, length, BLOCK_T):
        tl.store(checkpoints + (start // BLOCK_T) * d, carry, mask=in_d)
        t = start + step[:, None]
        inside = (t < length) & in_d[None, :]
        z = tl.load(gate + t * sp_t, mask=inside, other=0.0).to(tl.float32) + bias_c
        x = tl.load(gate + t * sp_t + d * sp_d, mask=inside, other=0.0).to(tl.float32)
        a = tl.where(inside, _sigmoid(SIGN * z), 1.0)
        a_cum, b_cum = tl.associative_scan((a, (1.0 - a) * x), 0, _compose)
        h = a_cum * carry[None, :] + b_cum
        o = tl.load(gate + t * sp_t + 2 * d * sp_d, mask=inside, other=0.0).to(tl.float32)
        tl.store(out + t * d, h * o * _sigmoid(o), mask=inside)
        carry = tl.sum(tl.where(step[:, None] == BLOCK_T - 1, h, 0.0), axis=0)
    tl.store(h_last + row * d + channel, carry, mask=in_d)


@triton.jit
def gated_backward_kernel(proj, bias, checkpoints, d_out, d_last, d_proj, d_bias, d_h0, sp_b, sp_t, sp_d,
                          so_b, so_t, so_d, length, d,
                          SIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The gradient of `gated_forward_kernel`, chunks from the last. In each chunk h is recomputed
    from the chunk's checkpoint, then the adjoint G_t = dh_t + a_{t+1} * G_{t+1} is scanned
    backwards with the carry from the chunk after. da_t = G_t (h_{t-1} - x_t), and since
    a_t h_{t-1} = h_t - (1 - a_t) x_t, dz = SIGN * da * a (1 - a) = SIGN * G (h - x) (1 - a): no
    h_{t-1}. dx = G (1 - a), do = d_out h silu'(o), d_h0 = G_0 a_0.
    d_out: (batch, T, d), any strides; d_last: the gradient of h_last (zeros if unused); d_proj
    (batch, T, 3d) contiguous, proj's dtype; d_bias: (batch, d), each row's sum over time."""
    row, channel, step, in_d, gate, bias_c = _gated_tile(proj, bias, sp_b, sp_d, d, BLOCK_T, BLOCK_D)
    d_out += row * so_b + channel[None, :] * so_d
    d_proj += row * length * 3 * d + channel[None, :]
    checkpoints += row * tl.cdiv(length, BLOCK_T) * d + channel
    last_g = tl.load(d_last + row * d + channel, mask=in_d, other=0.0)[None, :]
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    bias_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for chunk in range(tl.cdiv(length, BLOCK_T) - 1, -1, -1):
        t = chunk * BLOCK_T + step[:, None]
        inside = (t < length) & in_d[None, :]
        z = tl.load(gate + t * sp_t, mask=inside, other=0.0).to(tl.float32) + bias_c
        x = tl.load(gate + t * sp_t + d * sp_d, mask=inside, other=0.0).to(tl.float32)
        a = tl.where(inside, _sigmoid(SIGN * z), 1.0)
        a_cum, b_cum = tl.associative_scan((a, (1.0 - a) * x), 0, _compose)
        h = a_cum * tl.load(checkpoints + chunk * d, mask=in_d, other=0.0)[None, :] + b_cum
        o = tl.load(gate + t * sp_t + 2 * d * sp_d, mask=inside, other=0.0).to(tl.float32)
        s = _sigmoid(o)
        g_out = tl.load(d_out + t * so_t, mask=inside, other=0.0).to(tl.float32)
        dh = g_out * o * s + tl.where(t == length - 1, last_g, 0.0)
        after = (t + 1 < length) & in_d[None, :]
        z_next = tl.load(gate + (t + 1) * sp_t, mask=after, other=0.0).to(tl.float32) + bias_c
        a_back, g_back = tl.associative_scan((tl.where(after, _sigmoid(SIGN * z_next), 0.0), dh), 0, _compose,
                                             reverse=True)
        g = a_back * carry[None, :] + g_back
        dz = SIGN * g * (h - x) * (1.0 - a)
        tl.store(d_proj + t * 3 * d, dz, mask=inside)
        tl.store(d_proj + t * 3 * d + d, g * (1.0 - a), mask=inside)
        tl.store(d_proj + t * 3 * d + 2 * d, g_out * h * s * (1.0 + o * (1.0 - s)), mask=inside)
        bias_sum += tl.sum(tl.where(inside, dz, 0.0), axis=0)
        carry = tl.sum(tl.where(step[:, None] == 0, g, 0.0), axis=0)
    a_first = _sigmoid(SIGN * (tl.load(gate, mask=in_d[None, :], other=0.0).to(tl.float32) + bias_c))
    tl.store(d_h0 + row * d + channel, carry * tl.sum(a_first, axis=0), mask=in_d)
    tl.store(d_bias + row * d + channel, bias_sum, mask=in_d)
