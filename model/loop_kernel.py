"""The Triton programs behind `model.fused_loop` (imported only where Triton is installed).

`forward_kernel`: one program per user runs a training chunk's whole write loop on pool indexes,
as `model.pooled_writes.pooled_row` does row by row, and stores each row's indexes, strengths and
read coefficients. `backward_kernel`: one program per user walks the rows back and carries the
gradient of the strengths from row to row; the gradients of size d (pool values) are left to two
batched products in torch. Compiled for CUDA; with TRITON_INTERPRET=1 set before Triton is
imported (tests/conftest.py), Triton's interpreter runs them on CPU tensors.
"""

import triton
import triton.language as tl

from model.write_kernel import neuromodulator, predicted_values, read_weights


@triton.jit
def _novelty(scores, used):
    """1 - max(0, the best score of a used slot) (-1 where none is used), and that slot."""
    masked = tl.where(used, scores, -1.0)
    return 1.0 - tl.maximum(tl.max(masked, axis=0), 0.0), tl.max(masked, axis=0), tl.argmax(masked, axis=0)


def pooled_loop_forward(row_scores, pool_values, value_norms, strengths0, index_rows, strength_rows, wrote_rows,
                        coefficients, miss_norms, w1, b1, w2, b2, sharpness,
                        srs_b, srs_r, srs_p, spv_b, spv_p, spv_d, svn_b, svn_r, ss0_b, ss0_m,
                        rows, m, d, decay, budget, threshold,
                        TOPK: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """One user's loop. row_scores (b, R, m + R): each written row's key against the pool;
    pool_values (b, m + R, d), whose item m + r is row r's value; value_norms (b, R); strengths0
    (b, m). Stores, contiguous: index_rows and strength_rows (b, R + 1, m), row r + 1 after row r's
    write; wrote_rows (b, R); coefficients (b, R, m + R), zero on entry: row r's read weights on
    the pool; miss_norms (b, R): |value - predicted|."""
    user = tl.program_id(0)
    pool = m + rows
    slot = tl.arange(0, BLOCK_M)
    in_m = slot < m
    lane = tl.arange(0, BLOCK_V)
    index = slot
    strengths = tl.load(strengths0 + user * ss0_b + slot * ss0_m, mask=in_m, other=0.0)
    tl.store(index_rows + user * (rows + 1) * m + slot, index.to(tl.int64), mask=in_m)
    tl.store(strength_rows + user * (rows + 1) * m + slot, strengths, mask=in_m)
    sharp = 0.0
    if TOPK != 0:
        sharp = tl.load(sharpness)
    values = pool_values + user * spv_b
    for row in range(0, rows):
        item = m + row
        scores = tl.load(row_scores + user * srs_b + row * srs_r + index * srs_p, mask=in_m, other=0.0)
        used = (strengths > 0) & in_m
        weights = read_weights(scores, strengths, used, slot, in_m, sharp, TOPK)[0]
        miss_sq = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, d, BLOCK_V):
            at = start + lane
            predicted = predicted_values(values, index, weights, slot, at, d, spv_p, spv_d, TOPK, BLOCK_V)
            miss = tl.load(values + item * spv_p + at * spv_d, mask=at < d, other=0.0) - predicted
            miss_sq += tl.where(at < d, miss * miss, 0.0)
        miss_norm = tl.sqrt(tl.sum(miss_sq, axis=0))
        surprise = miss_norm / tl.load(value_norms + user * svn_b + row * svn_r)
        novelty = _novelty(scores, used)[0]
        fill = tl.sum(used.to(tl.float32), axis=0) / m
        strength = neuromodulator(w1, b1, w2, b2, surprise, novelty, fill, HIDDEN)
        wrote = strength > threshold
        decayed = strengths * decay
        taken = tl.where(slot == tl.argmin(tl.where(in_m, decayed, 3.0e38), axis=0), wrote, False)
        renewed = tl.where(taken, strength, decayed)
        scale = tl.minimum(budget / tl.maximum(tl.sum(tl.where(in_m, renewed, 0.0), axis=0), 1e-6), 1.0)
        strengths = renewed * scale
        tl.store(coefficients + (user * rows + row) * pool + index, weights, mask=in_m)
        tl.store(miss_norms + user * rows + row, miss_norm)
        tl.store(wrote_rows + user * rows + row, wrote.to(tl.int8))
        index = tl.where(taken, item, index)
        tl.store(index_rows + (user * (rows + 1) + row + 1) * m + slot, index.to(tl.int64), mask=in_m)
        tl.store(strength_rows + (user * (rows + 1) + row + 1) * m + slot, strengths, mask=in_m)


def pooled_loop_backward(row_scores, value_norms, index_rows, strength_rows, miss_norms, miss_dots, grad_strength_rows,
                         grad_row_scores, grad_value_norms, miss_scales, grad_strengths0, grad_rule,
                         w1, b1, w2, b2, sharpness,
                         srs_b, srs_r, srs_p, svn_b, svn_r,
                         rows, m, decay, budget, threshold,
                         TOPK: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """One user's rows, last to first: what `forward_kernel` computed, recomputed from the rows it
    stored, then its gradient. miss_dots (b, R, m + R): (value - predicted) of row r against every
    pool item; grad_strength_rows (b, R + 1, m): the loss's gradient of each row's strengths
    (contiguous). Stores, contiguous: grad_row_scores (b, R, m + R), zero on entry;
    grad_value_norms (b, R); miss_scales (b, R): c with d loss / d (value - predicted) = c x
    (value - predicted); grad_strengths0 (b, m); grad_rule (b, 5 x HIDDEN + 2): this user's part
    of the gradients of w1 (HIDDEN x 3), b1, w2, b2 and the sharpness."""
    user = tl.program_id(0)
    pool = m + rows
    slot = tl.arange(0, BLOCK_M)
    in_m = slot < m
    unit = tl.arange(0, HIDDEN)
    sharp = 0.0
    if TOPK != 0:
        sharp = tl.load(sharpness)
    first = w1 + unit * 3
    w_surprise, w_novelty, w_fill = tl.load(first), tl.load(first + 1), tl.load(first + 2)
    bias1, weight2, bias2 = tl.load(b1 + unit), tl.load(w2 + unit), tl.load(b2)
    grad_w1_surprise = tl.zeros([HIDDEN], dtype=tl.float32)
    grad_w1_novelty = tl.zeros([HIDDEN], dtype=tl.float32)
    grad_w1_fill = tl.zeros([HIDDEN], dtype=tl.float32)
    grad_b1 = tl.zeros([HIDDEN], dtype=tl.float32)
    grad_w2 = tl.zeros([HIDDEN], dtype=tl.float32)
    grad_b2 = tl.sum(tl.zeros([HIDDEN], dtype=tl.float32), axis=0)  # fp32 scalars carried by the loop
    grad_sharp = tl.sum(tl.zeros([HIDDEN], dtype=tl.float32), axis=0)
    carried = tl.load(grad_strength_rows + (user * (rows + 1) + rows) * m + slot, mask=in_m, other=0.0)
    for back in range(0, rows):
        row = rows - 1 - back
        index = tl.load(index_rows + (user * (rows + 1) + row) * m + slot, mask=in_m, other=0).to(tl.int32)
        strengths = tl.load(strength_rows + (user * (rows + 1) + row) * m + slot, mask=in_m, other=0.0)
        scores = tl.load(row_scores + user * srs_b + row * srs_r + index * srs_p, mask=in_m, other=0.0)
        used = (strengths > 0) & in_m
        weights, softmax, chose = read_weights(scores, strengths, used, slot, in_m, sharp, TOPK)
        miss_norm = tl.load(miss_norms + user * rows + row)
        value_norm = tl.load(value_norms + user * svn_b + row * svn_r)
        surprise = miss_norm / value_norm
        novelty, best, best_slot = _novelty(scores, used)
        fill = tl.sum(used.to(tl.float32), axis=0) / m
        pre = bias1 + w_surprise * surprise + w_novelty * novelty + w_fill * fill
        gate = 1.0 / (1.0 + tl.exp(-pre))
        hidden = pre * gate
        strength = 1.0 / (1.0 + tl.exp(-(tl.sum(weight2 * hidden, axis=0) + bias2)))
        wrote = strength > threshold
        decayed = strengths * decay
        taken = tl.where(slot == tl.argmin(tl.where(in_m, decayed, 3.0e38), axis=0), wrote, False)
        renewed = tl.where(taken, strength, decayed)
        total = tl.sum(tl.where(in_m, renewed, 0.0), axis=0)
        ratio = budget / tl.maximum(total, 1e-6)

        # strengths = renewed * min(ratio, 1), ratio = budget / max(sum(renewed), 1e-6)
        through = tl.sum(tl.where(in_m, carried * renewed, 0.0), axis=0) * ratio / total
        rescaled = tl.where(ratio <= 1.0, tl.where(total >= 1e-6, through, 0.0), 0.0)  # where both clamps pass
        grad_renewed = carried * tl.minimum(ratio, 1.0) - rescaled
        grad_strength = tl.sum(tl.where(taken, grad_renewed, 0.0), axis=0)
        grad_strengths = tl.where(taken | ~in_m, 0.0, grad_renewed) * decay
        # the neuromodulator: strength = sigmoid(w2 . silu(w1 [surprise, novelty, fill] + b1) + b2)
        grad_out = grad_strength * strength * (1.0 - strength)
        grad_w2 += grad_out * hidden
        grad_b2 += grad_out
        grad_pre = grad_out * weight2 * gate * (1.0 + pre * (1.0 - gate))
        grad_w1_surprise += grad_pre * surprise
        grad_w1_novelty += grad_pre * novelty
        grad_w1_fill += grad_pre * fill
        grad_b1 += grad_pre
        grad_surprise = tl.sum(grad_pre * w_surprise, axis=0)
        grad_novelty = tl.sum(grad_pre * w_novelty, axis=0)
        # novelty = 1 - max(best, 0): the best used slot's score
        grad_scores = tl.where((slot == best_slot) & used, tl.where(best >= 0.0, -grad_novelty, 0.0), 0.0)
        # surprise = |miss| / value_norm; d loss / d predicted = -c miss, so d / d weights = -c dots
        tl.store(grad_value_norms + user * rows + row, -grad_surprise * surprise / value_norm)
        scale = tl.where(miss_norm > 0.0, grad_surprise / (value_norm * miss_norm), 0.0)
        tl.store(miss_scales + user * rows + row, scale)
        dots = tl.load(miss_dots + (user * rows + row) * pool + index, mask=in_m, other=0.0)
        grad_weights = tl.where(in_m, -scale * dots, 0.0)  # also where a weight is 0: PM's unused slots
        if TOPK == 0:
            grad_scores += grad_weights * strengths
            grad_strengths += tl.where(in_m, grad_weights * scores, 0.0)
        else:  # weights = used x softmax(sharp x top scores) over the k slots chosen
            grad_softmax = tl.where(chose & used, grad_weights, 0.0)
            grad_logits = softmax * (grad_softmax - tl.sum(softmax * grad_softmax, axis=0))
            grad_logits = tl.where(chose, grad_logits, 0.0)
            grad_scores += tl.where(used, grad_logits * sharp, 0.0)
            grad_sharp += tl.sum(grad_logits * tl.where(used, scores, -1e4), axis=0)
        tl.store(grad_row_scores + (user * rows + row) * pool + index, grad_scores, mask=in_m)
        carried = grad_strengths + tl.load(grad_strength_rows + (user * (rows + 1) + row) * m + slot, mask=in_m,
                                           other=0.0)
    tl.store(grad_strengths0 + user * m + slot, carried, mask=in_m)
    out = grad_rule + user * (5 * HIDDEN + 2)
    tl.store(out + unit * 3, grad_w1_surprise)
    tl.store(out + unit * 3 + 1, grad_w1_novelty)
    tl.store(out + unit * 3 + 2, grad_w1_fill)
    tl.store(out + 3 * HIDDEN + unit, grad_b1)
    tl.store(out + 4 * HIDDEN + unit, grad_w2)
    tl.store(out + 5 * HIDDEN, grad_b2)
    tl.store(out + 5 * HIDDEN + 1, grad_sharp)


forward_kernel = triton.jit(pooled_loop_forward)
backward_kernel = triton.jit(pooled_loop_backward)
