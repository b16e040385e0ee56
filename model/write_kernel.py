"""The Triton programs behind `model.fused_write` (imported only where Triton is installed).

`kernel`: one program per (user, memory instance) of a stacked write; it does what
`model.memory.write_slots` does for that pair, and empties the trace as `close_spans` does.
`scores_kernel`: the write's scores of the trace key against the slot keys, a chunk of slots per
program. A large memory (EM at `base`: 256 slots x 768 floats, 786 KB a user) streamed by the
write's one program per pair took 59 us at 256 users on the H200, for ~16 pairs whose span
ended; spread over chunks its keys are read by many SMs at once, and `kernel` takes the scores.
Compiled for CUDA; with TRITON_INTERPRET=1 set before Triton is imported (tests/conftest.py),
Triton's interpreter runs them on CPU tensors instead.
"""

import triton
import triton.language as tl


def write_slot_kernel(keys, values, strengths, trace_keys, trace_values, sum_keys, sum_values, closes, writes,
                       given_scores, w1, b1, w2, b2, sharpness,
                       sk_b, sk_n, sk_m, sk_d, sv_b, sv_n, sv_m, sv_d, ss_b, ss_n, ss_m,
                       stk_b, stk_n, stk_d, stv_b, stv_n, stv_d, ssk_b, ssk_n, ssk_d, ssv_b, ssv_n, ssv_d,
                       m, d, span, decay, budget, threshold,
                       HAS_CLOSES: tl.constexpr, HAS_SUMS: tl.constexpr, SCORES_GIVEN: tl.constexpr,
                       TOPK: tl.constexpr,
                       HIDDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_V: tl.constexpr):
    """One (user, instance): the comments name the lines of `write_slots` each step stands for.
    HAS_SUMS: every user's trace first takes sum_keys, sum_values (the sums of the call's last row).
    SCORES_GIVEN: `scores_kernel` wrote the scores to given_scores ((b, n, m), contiguous).
    BLOCK_D: the width of a (BLOCK_M, BLOCK_D) tile of slots; BLOCK_V: of one row (trace, value,
    the slot written), so a row of `base` is one load, not a chain of 12 dependent ones."""
    user = tl.program_id(0)
    instance = tl.program_id(1)
    n = tl.num_programs(1)
    closing = True
    if HAS_CLOSES:
        closing = tl.load(closes + user) != 0
    row_lane = tl.arange(0, BLOCK_V)
    trace_key = trace_keys + user * stk_b + instance * stk_n
    trace_value = trace_values + user * stv_b + instance * stv_n
    if HAS_SUMS:  # trace += sums, for every user; the lines below read it back
        for start in range(0, d, BLOCK_V):
            at = start + row_lane
            tk = tl.load(trace_key + at * stk_d, mask=at < d, other=0.0)
            tv = tl.load(trace_value + at * stv_d, mask=at < d, other=0.0)
            tk += tl.load(sum_keys + user * ssk_b + instance * ssk_n + at * ssk_d, mask=at < d, other=0.0)
            tv += tl.load(sum_values + user * ssv_b + instance * ssv_n + at * ssv_d, mask=at < d, other=0.0)
            tl.store(trace_key + at * stk_d, tk, mask=at < d)
            tl.store(trace_value + at * stv_d, tv, mask=at < d)
        tl.debug_barrier()
    if closing:
        slot = tl.arange(0, BLOCK_M)
        in_m = slot < m
        lane = tl.arange(0, BLOCK_D)
        key_row = keys + user * sk_b + instance * sk_n
        value_row = values + user * sv_b + instance * sv_n

        # key = normalize(trace.keys); value = trace.values / span: their norms first.
        key_sq = tl.zeros([BLOCK_V], dtype=tl.float32)
        value_sq = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, d, BLOCK_V):
            at = start + row_lane
            tk = tl.load(trace_key + at * stk_d, mask=at < d, other=0.0)
            tv = tl.load(trace_value + at * stv_d, mask=at < d, other=0.0)
            key_sq += tk * tk
            value_sq += tv * tv
        inv_key_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(key_sq, axis=0)), 1e-12)
        value_norm = tl.sqrt(tl.sum(value_sq, axis=0)) / span

        # scores = key @ slots.keys^T
        if SCORES_GIVEN:
            scores = tl.load(given_scores + (user * n + instance) * m + slot, mask=in_m, other=0.0)
        else:
            scores = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, d, BLOCK_D):
                at = start + lane
                key = tl.load(trace_key + at * stk_d, mask=at < d, other=0.0) * inv_key_norm
                tile = tl.load(key_row + slot[:, None] * sk_m + at[None, :] * sk_d,
                               mask=in_m[:, None] & (at[None, :] < d), other=0.0)
                scores += tl.sum(tile * key[None, :], axis=1)
        strength_row = strengths + user * ss_b + instance * ss_n + slot * ss_m
        old = tl.load(strength_row, mask=in_m, other=0.0)
        used = (old > 0) & in_m

        # read: PM's strength-weighted sum, or EM's softmax over the top-k used slots
        sharp = 0.0
        if TOPK != 0:
            sharp = tl.load(sharpness + instance)
        weights = read_weights(scores, old, used, slot, in_m, sharp, TOPK)[0]

        # predicted = read; surprise = |value - predicted| / (|value| + 1e-6)
        miss_sq = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, d, BLOCK_V):
            at = start + row_lane
            predicted = predicted_values(value_row, slot, weights, slot, at, d, sv_m, sv_d, TOPK, BLOCK_V)
            miss = tl.load(trace_value + at * stv_d, mask=at < d, other=0.0) / span - predicted
            miss_sq += tl.where(at < d, miss * miss, 0.0)
        surprise = tl.sqrt(tl.sum(miss_sq, axis=0)) / (value_norm + 1e-6)
        novelty = 1.0 - tl.maximum(tl.max(tl.where(used, scores, -1.0), axis=0), 0.0)
        fill = tl.sum(used.to(tl.float32), axis=0) / m

        strength = neuromodulator(w1 + instance * HIDDEN * 3, b1 + instance * HIDDEN, w2 + instance * HIDDEN,
                                  b2 + instance, surprise, novelty, fill, HIDDEN)
        wrote = strength > threshold

        # the weakest slot (first minimum of the decayed strengths) takes the item; budget rescale
        decayed = old * decay
        weakest = tl.argmin(tl.where(in_m, decayed, 3.0e38), axis=0)
        taken = tl.where(slot == weakest, wrote, False)
        renewed = tl.where(taken, strength, decayed)
        scale = tl.minimum(budget / tl.maximum(tl.sum(tl.where(in_m, renewed, 0.0), axis=0), 1e-6), 1.0)
        tl.store(strength_row, renewed * scale, mask=in_m)
        for start in range(0, d, BLOCK_V):
            at = start + row_lane
            tk = tl.load(trace_key + at * stk_d, mask=at < d, other=0.0)
            tv = tl.load(trace_value + at * stv_d, mask=at < d, other=0.0)
            written = tl.where(at < d, wrote, False)
            tl.store(key_row + weakest * sk_m + at * sk_d, tk * inv_key_norm, mask=written)
            tl.store(value_row + weakest * sv_m + at * sv_d, tv / span, mask=written)
            tl.store(trace_key + at * stk_d, tl.zeros([BLOCK_V], dtype=tl.float32), mask=at < d)  # emptied
            tl.store(trace_value + at * stv_d, tl.zeros([BLOCK_V], dtype=tl.float32), mask=at < d)
        tl.store(writes + user * n + instance, wrote.to(tl.int32))


def slot_scores_kernel(keys, trace_keys, sum_keys, closes, scores,
                       sk_b, sk_n, sk_m, sk_d, stk_b, stk_n, stk_d, ssk_b, ssk_n, ssk_d, m, d,
                       HAS_CLOSES: tl.constexpr, HAS_SUMS: tl.constexpr, BLOCK_S: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """Chunk `program_id(2)` of one (user, instance)'s scores = normalize(trace.keys) @ keys^T,
    into scores (b, n, m), contiguous; users whose span does not end are skipped. HAS_SUMS: the
    trace is trace_keys + sum_keys (`kernel`, launched next, adds them)."""
    user = tl.program_id(0)
    instance = tl.program_id(1)
    n = tl.num_programs(1)
    closing = True
    if HAS_CLOSES:
        closing = tl.load(closes + user) != 0
    if closing:
        slot = tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
        in_m = slot < m
        lane = tl.arange(0, BLOCK_D)
        key_row = keys + user * sk_b + instance * sk_n
        trace_key = trace_keys + user * stk_b + instance * stk_n
        sum_key = sum_keys + user * ssk_b + instance * ssk_n
        key_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, d, BLOCK_D):
            at = start + lane
            tk = tl.load(trace_key + at * stk_d, mask=at < d, other=0.0)
            if HAS_SUMS:
                tk += tl.load(sum_key + at * ssk_d, mask=at < d, other=0.0)
            key_sq += tk * tk
        inv_key_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(key_sq, axis=0)), 1e-12)
        total = tl.zeros([BLOCK_S], dtype=tl.float32)
        for start in range(0, d, BLOCK_D):
            at = start + lane
            key = tl.load(trace_key + at * stk_d, mask=at < d, other=0.0)
            if HAS_SUMS:
                key += tl.load(sum_key + at * ssk_d, mask=at < d, other=0.0)
            key = key * inv_key_norm
            tile = tl.load(key_row + slot[:, None] * sk_m + at[None, :] * sk_d,
                           mask=in_m[:, None] & (at[None, :] < d), other=0.0)
            total += tl.sum(tile * key[None, :], axis=1)
        tl.store(scores + (user * n + instance) * m + slot, total, mask=in_m)


@triton.jit
def read_weights(scores, strengths, used, slot, in_m, sharp, TOPK: tl.constexpr):
    """A write's read over the slots: PM's scores x strengths, or EM's softmax over the top-k used
    slots. Returns the weights (BLOCK_M) and, for EM, the softmax over the k slots picked (0
    elsewhere) and which slots were picked (the backward of `model.loop_kernel` needs them)."""
    if TOPK == 0:
        weights = scores * strengths
        softmax = scores * 0.0
        chose = slot < 0
    else:
        ranked = tl.where(in_m, tl.where(used, scores, -1e4), -3.0e38)
        top = tl.max(ranked, axis=0)
        picked = tl.zeros_like(scores)
        chose = slot < 0
        total = 0.0
        for _pick in tl.static_range(TOPK):
            best = tl.max(ranked, axis=0)
            chosen = slot == tl.argmax(ranked, axis=0)
            e = tl.exp((best - top) * sharp)
            picked = tl.where(chosen, e, picked)
            chose = chose | chosen
            total += e
            ranked = tl.where(chosen, -3.0e38, ranked)
        softmax = picked / total
        weights = tl.where(used, softmax, 0.0)
    return weights, softmax, chose


@triton.jit
def predicted_values(values, rows, weights, slot, at, d, stride_row, stride_d, TOPK: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    """Columns `at` of the read's prediction, sum of weights x values[rows]: PM one tile of its
    rows, EM its top-k rows only, found again by weight (the others weigh 0). rows (BLOCK_M): the
    row of `values` each slot reads."""
    if TOPK == 0:
        tile = tl.load(values + rows[:, None] * stride_row + at[None, :] * stride_d,
                       mask=(weights != 0.0)[:, None] & (at[None, :] < d), other=0.0)
        predicted = tl.sum(tile * weights[:, None], axis=0)
    else:
        predicted = tl.zeros([BLOCK_V], dtype=tl.float32)
        remaining = weights
        for _pick in tl.static_range(TOPK):
            weight = tl.max(remaining, axis=0)
            pick = tl.argmax(remaining, axis=0)
            remaining = tl.where(slot == pick, -1.0, remaining)
            row = tl.sum(tl.where(slot == pick, rows, 0), axis=0)
            weighed = (at < d) & (tl.zeros([BLOCK_V], dtype=tl.float32) + weight != 0.0)
            predicted += weight * tl.load(values + row * stride_row + at * stride_d, mask=weighed, other=0.0)
    return predicted


@triton.jit
def neuromodulator(w1, b1, w2, b2, surprise, novelty, fill, HIDDEN: tl.constexpr):
    """One instance's write strength, sigmoid(w2 @ silu(w1 @ [surprise, novelty, fill] + b1) + b2);
    the pointers are that instance's rows."""
    unit = tl.arange(0, HIDDEN)
    first = w1 + unit * 3
    pre = tl.load(b1 + unit) + tl.load(first) * surprise + tl.load(first + 1) * novelty + tl.load(first + 2) * fill
    out = tl.sum(tl.load(w2 + unit) * (pre / (1.0 + tl.exp(-pre))), axis=0) + tl.load(b2)
    return 1.0 / (1.0 + tl.exp(-out))


kernel = triton.jit(write_slot_kernel)
scores_kernel = triton.jit(slot_scores_kernel)
