"""The Triton programs behind `model.scan.triton_scan` and `model.scan.gated_scan` (imported only
where Triton is installed).

All work in the model's (batch, T, d) layout, with any input strides. A plain-scan program owns one batch
row and BLOCK_D contiguous channels (one coalesced segment of each time row) and walks T in chunks
of BLOCK_T rows: an associative scan of the affine maps inside a chunk, then the carry from the
chunk before. `forward_kernel` stores h; `backward_kernel` runs the same scan backwards in time on
the output gradient and needs h, the forward's output, for d_a. The gated kernels (the mixer's
gates, scan and output gate in one pass) walk time the other way: each thread carries its channel
step by step, a chunk's loads issued before its stores, time split into segments joined by summary
passes where the batch is small (`model.scan.gated_scan` says why). Compiled for CUDA; with
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
def _gated_program(proj, bias, sp_b, sp_d, length, d, segment_len, BLOCK_D: tl.constexpr):
    """A gated program's batch row, its BLOCK_D channels (and which are inside d), the pointer to its
    channels' gate pre-activations in proj (x and o follow at d and 2d channels), their gate biases,
    and its segment of time: the segment's index, [begin, stop), and stop again as a vector of
    BLOCK_D copies for masks (Triton's interpreter gives a scalar comparison and-ed with a vector
    an integer type, which a mask may not have; a vector comparison stays boolean)."""
    row = tl.program_id(0).to(tl.int64)
    channel = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = channel < d
    bias_c = tl.load(bias + channel, mask=in_d, other=0.0)
    segment = tl.program_id(2)
    begin = segment * segment_len
    stop = tl.minimum(begin + segment_len, length)
    return row, channel, in_d, proj + row * sp_b + channel * sp_d, bias_c, segment, begin, stop, stop + 0 * channel


@triton.jit
def _retention(gate, t, sp_t, bias_c, mask, SIGN: tl.constexpr):
    """a_t = sigmoid(SIGN * (z_t + bias)) where mask holds, 1 (the identity step) elsewhere."""
    z = tl.load(gate + t * sp_t, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, _sigmoid(SIGN * (z + bias_c)), 1.0)


@triton.jit
def _step_inputs(gate, t, sp_t, sp_d, d, mask):
    """Step t's gate pre-activation z, input x and output gate o, float32 (zeros where masked)."""
    step = gate + t * sp_t
    return (tl.load(step, mask=mask, other=0.0).to(tl.float32),
            tl.load(step + d * sp_d, mask=mask, other=0.0).to(tl.float32),
            tl.load(step + 2 * d * sp_d, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def gated_summary_kernel(proj, bias, summary, sp_b, sp_t, sp_d, length, d, segment_len, n_segments,
                         SIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Each segment's affine map h_end = A h_begin + B (all but the last segment): A the product of
    its a, B its h from zero, into summary (batch, segments, 2, d). `gated_forward_kernel` composes
    the earlier segments' maps into its carry, so segments of one row run side by side."""
    row, channel, in_d, gate, bias_c, segment, begin, stop, end = _gated_program(
        proj, bias, sp_b, sp_d, length, d, segment_len, BLOCK_D)
    product = tl.full([BLOCK_D], 1.0, dtype=tl.float32)
    h = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(begin, stop, BLOCK_T):
        for i in tl.static_range(BLOCK_T):
            t = start + i
            inside = in_d & (t < end)
            a = _retention(gate, t, sp_t, bias_c, inside, SIGN)
            x = tl.load(gate + t * sp_t + d * sp_d, mask=inside, other=0.0).to(tl.float32)
            h = a * h + (1.0 - a) * x
            product *= a
    summary += (row * n_segments + segment) * 2 * d + channel
    tl.store(summary, product, mask=in_d)
    tl.store(summary + d, h, mask=in_d)


@triton.jit
def gated_forward_kernel(proj, bias, h0, out, h_all, h_last, summary, sp_b, sp_t, sp_d, length, d, segment_len,
                         n_segments, STORE_H: tl.constexpr, SIGN: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """The mixer from its input projection to its output gate, in one pass (`model.scan.gated_scan`):
    proj (batch, T, 3d), any strides, holds each step's gate pre-activation z, input x and output
    gate o; a = sigmoid(SIGN * (z + bias)), h_t = a * h_{t-1} + (1 - a) * x from h0 (batch, d), and
    out = h * silu(o) (batch, T, d) in proj's dtype; with STORE_H, h_all = h (batch, T, d) in proj's
    dtype for the backward. h_last = h_{T-1}.

    Each thread walks its channel through time one step after another, BLOCK_T steps unrolled so
    that their loads are in flight together; a program owns one segment of time, starting from the
    carry that the earlier segments' summaries compose (`gated_summary_kernel`)."""
    row, channel, in_d, gate, bias_c, segment, begin, stop, end = _gated_program(
        proj, bias, sp_b, sp_d, length, d, segment_len, BLOCK_D)
    h = tl.load(h0 + row * d + channel, mask=in_d, other=0.0)
    summary += row * n_segments * 2 * d + channel
    for earlier in range(0, segment):
        h = tl.load(summary + earlier * 2 * d, mask=in_d, other=1.0) * h + tl.load(
            summary + earlier * 2 * d + d, mask=in_d, other=0.0)
    out += row * length * d + channel
    h_all += row * length * d + channel
    for start in range(begin, stop, BLOCK_T):
        loaded = ()  # the chunk's loads first: a store between them would leave each step's loads waiting
        for i in tl.static_range(BLOCK_T):
            loaded = loaded + (_step_inputs(gate, start + i, sp_t, sp_d, d, in_d & (start + i < end)),)
        for i in tl.static_range(BLOCK_T):
            t = start + i
            inside = in_d & (t < end)
            z, x, o = loaded[i]
            a = tl.where(inside, _sigmoid(SIGN * (z + bias_c)), 1.0)
            h = a * h + (1.0 - a) * x
            tl.store(out + t * d, (h * o * _sigmoid(o)).to(out.dtype.element_ty), mask=inside)
            if STORE_H:
                tl.store(h_all + t * d, h.to(h_all.dtype.element_ty), mask=inside)
    if segment == n_segments - 1:
        tl.store(h_last + row * d + channel, h, mask=in_d)


@triton.jit
def _output_adjoint(gate, d_out, t, sp_t, so_t, d, sp_d, mask):
    """dh_t = d_out_t o_t sigmoid(o_t): what out = h silu(o) sends back to h_t."""
    o = tl.load(gate + t * sp_t + 2 * d * sp_d, mask=mask, other=0.0).to(tl.float32)
    return tl.load(d_out + t * so_t, mask=mask, other=0.0).to(tl.float32) * o * _sigmoid(o)


@triton.jit
def gated_backward_summary_kernel(proj, bias, d_out, summary, sp_b, sp_t, sp_d, so_b, so_t, so_d, length, d,
                                  segment_len, n_segments, SIGN: tl.constexpr, BLOCK_T: tl.constexpr,
                                  BLOCK_D: tl.constexpr):
    """Each segment's map of the adjoint backwards, G_begin = P G_(next begin) + Q (all but the first
    segment; the program's segment is program_id(2) + 1): P the product of a_{t+1} over it (a_T = 1),
    Q its G_begin from zero. G_t = dh_t + a_{t+1} G_{t+1}, as in `gated_backward_kernel`."""
    row, channel, in_d, gate, bias_c, segment, begin, stop, end = _gated_program(
        proj, bias, sp_b, sp_d, length, d, segment_len, BLOCK_D)
    segment += 1
    begin += segment_len
    stop = tl.minimum(stop + segment_len, length)
    end = stop + 0 * channel
    d_out += row * so_b + channel * so_d
    a_next = _retention(gate, stop, sp_t, bias_c, in_d & (end < length), SIGN)
    product = tl.full([BLOCK_D], 1.0, dtype=tl.float32)
    g = tl.zeros([BLOCK_D], dtype=tl.float32)
    for chunk in range(tl.cdiv(stop - begin, BLOCK_T) - 1, -1, -1):
        for i in tl.static_range(BLOCK_T):
            t = begin + chunk * BLOCK_T + (BLOCK_T - 1 - i)
            inside = in_d & (t < end)
            g = tl.where(inside, _output_adjoint(gate, d_out, t, sp_t, so_t, d, sp_d, inside) + a_next * g, g)
            product = tl.where(inside, product * a_next, product)
            a_next = tl.where(inside, _retention(gate, t, sp_t, bias_c, inside, SIGN), a_next)
    summary += (row * n_segments + segment) * 2 * d + channel
    tl.store(summary, product, mask=in_d)
    tl.store(summary + d, g, mask=in_d)


@triton.jit
def gated_backward_kernel(proj, bias, h_all, d_out, d_last, d_proj, d_bias, d_h0, summary, sp_b, sp_t, sp_d,
                          so_b, so_t, so_d, length, d, segment_len, n_segments,
                          SIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The gradient of `gated_forward_kernel`, each thread walking its channel backwards in time
    through its program's segment. The adjoint G_t = dh_t + a_{t+1} G_{t+1} starts from d_last
    (the gradient of h_last) and the later segments' summaries (`gated_backward_summary_kernel`).
    From h_t (the forward's h_all): da_t = G_t (h_{t-1} - x_t), and since a_t h_{t-1} = h_t - (1 -
    a_t) x_t, dz = SIGN * da * a (1 - a) = SIGN * G (h - x) (1 - a); dx = G (1 - a), do = d_out h
    silu'(o), d_h0 = G_0 a_0. d_out: (batch, T, d), any strides; d_proj (batch, T, 3d) contiguous,
    proj's dtype; d_bias: (batch, segments, d), each program's sum over its time."""
    row, channel, in_d, gate, bias_c, segment, begin, stop, end = _gated_program(
        proj, bias, sp_b, sp_d, length, d, segment_len, BLOCK_D)
    g = tl.load(d_last + row * d + channel, mask=in_d, other=0.0)
    summary += row * n_segments * 2 * d + channel
    for later in range(n_segments - 1, segment, -1):
        g = tl.load(summary + later * 2 * d, mask=in_d, other=1.0) * g + tl.load(
            summary + later * 2 * d + d, mask=in_d, other=0.0)
    a_next = _retention(gate, stop, sp_t, bias_c, in_d & (end < length), SIGN)
    d_out += row * so_b + channel * so_d
    h_all += row * length * d + channel
    d_proj += row * length * 3 * d + channel
    bias_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    kind = d_proj.dtype.element_ty
    for chunk in range(tl.cdiv(stop - begin, BLOCK_T) - 1, -1, -1):
        last = begin + chunk * BLOCK_T + BLOCK_T - 1
        loaded = ()  # the chunk's loads first, as in the forward
        for i in tl.static_range(BLOCK_T):
            inside = in_d & (last - i < end)
            z, x, o = _step_inputs(gate, last - i, sp_t, sp_d, d, inside)
            loaded = loaded + ((z, x, o, tl.load(d_out + (last - i) * so_t, mask=inside, other=0.0).to(tl.float32),
                                tl.load(h_all + (last - i) * d, mask=inside, other=0.0).to(tl.float32)),)
        for i in tl.static_range(BLOCK_T):
            t = last - i
            inside = in_d & (t < end)
            z, x, o, g_out, h = loaded[i]
            a = tl.where(inside, _sigmoid(SIGN * (z + bias_c)), 1.0)
            s = _sigmoid(o)
            g = tl.where(inside, g_out * o * s + a_next * g, g)
            dz = SIGN * g * (h - x) * (1.0 - a)
            tl.store(d_proj + t * 3 * d, dz.to(kind), mask=inside)
            tl.store(d_proj + t * 3 * d + d, (g * (1.0 - a)).to(kind), mask=inside)
            tl.store(d_proj + t * 3 * d + 2 * d, (g_out * h * s * (1.0 + o * (1.0 - s))).to(kind), mask=inside)
            bias_sum += tl.where(inside, dz, 0.0)
            a_next = tl.where(inside, a, a_next)
    if segment == 0:
        tl.store(d_h0 + row * d + channel, g * a_next, mask=in_d)
    tl.store(d_bias + (row * n_segments + segment) * d + channel, bias_sum, mask=in_d)
