"""A training chunk's write loop (`model.pooled_writes`) as one Triton kernel forward and one
backward, for each memory: model/loop_kernel.py.

Why: run row by row, a loop of 31 rows costs ~30 small kernels a row forward and as many
backward, for each of the 20 memories of `base`: most of a training step's ~38K kernels on the
H100 (bench/NOTES.md, session 8), each a few microseconds of almost no work. The loop's state is
small, (m,) indexes and strengths a user, so one program a user can carry it through every row.
The kernel stores what each row started from; the reads of every row stay batched products in
`run_pooled`. Backward, a program walks the rows back with the strengths' gradient; what has the
model's width d (the values' gradients) is two batched products here.

Float32 on CUDA with Triton installed; under TRITON_INTERPRET=1 the kernels run on CPU tensors
(how tests/test_kernels.py checks them against the torch loop).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from model.fused_write import next_power_of_2
from model.kernels import kernels_available, triton_kernels
from model.memory import WRITE_THRESHOLD, WriteRule


class LoopRows(NamedTuple):
    index: torch.Tensor  # (b, R + 1, m) int64: the pool item each slot holds before row r (row R: after all)
    strengths: torch.Tensor  # (b, R + 1, m)
    wrote: torch.Tensor  # (b, R) bool


def fused_loop_supported(pool_values: torch.Tensor) -> bool:
    """Whether `fused_loop_rows` can run this loop: float32 CUDA tensors with Triton installed,
    outside torch.compile (which traces the torch loop instead: `compiled_writes(loops=True)`)."""
    return (pool_values.is_cuda and pool_values.dtype == torch.float32 and not torch.compiler.is_compiling()
            and kernels_available("model.loop_kernel"))


def fused_loop_rows(rule: WriteRule, row_scores: torch.Tensor, pool_values: torch.Tensor, value_norms: torch.Tensor,
                    strengths: torch.Tensor) -> LoopRows:
    """The rows of `run_pooled`'s loop: row_scores (b, R, m + R), pool_values (b, m + R, d) with
    row r's item at m + r, value_norms (b, R) (|value| + 1e-6), strengths (b, m) before row 0;
    rule: one instance. Differentiable in all of them and in the rule's parameters."""
    sharpness = rule.sharpness if rule.sharpness is not None else rule.b2  # unread by PM's program
    index, strength_rows, wrote = _PooledLoop.apply(row_scores, pool_values, value_norms, strengths, rule.w1,
                                                    rule.b1, rule.w2, rule.b2, sharpness, rule.topk,
                                                    float(rule.decay), float(rule.budget))
    return LoopRows(index, strength_rows, wrote.bool())


class _PooledLoop(torch.autograd.Function):
    # Float32 kernels: under autocast the inputs are cast up and the products in backward stay
    # float32 (a bf16 product there fails against the kernels' float32 buffers).
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, row_scores, pool_values, value_norms, strengths, w1, b1, w2, b2, sharpness, topk, decay, budget):
        kernels = triton_kernels("model.loop_kernel")
        if kernels is None:
            raise RuntimeError("the fused write loop needs Triton (pip install triton); "
                               "use model.pooled_writes.run_pooled's torch loop")
        batch, rows, pool = row_scores.shape
        m, d = pool - rows, pool_values.shape[-1]
        hidden = w1.shape[1]
        pool_values = pool_values.contiguous()
        index = torch.empty(batch, rows + 1, m, dtype=torch.int64, device=row_scores.device)
        strength_rows = torch.empty(batch, rows + 1, m, dtype=row_scores.dtype, device=row_scores.device)
        wrote = torch.empty(batch, rows, dtype=torch.int8, device=row_scores.device)
        coefficients = torch.zeros(batch, rows, pool, dtype=row_scores.dtype, device=row_scores.device)
        miss_norms = torch.empty(batch, rows, dtype=row_scores.dtype, device=row_scores.device)
        block_m = next_power_of_2(m)
        block_v = min(next_power_of_2(d), max(16, 8192 // block_m)) if topk == 0 else min(next_power_of_2(d), 1024)
        kernels.forward_kernel[(batch,)](
            row_scores, pool_values, value_norms, strengths, index, strength_rows, wrote, coefficients, miss_norms,
            w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), sharpness,
            *row_scores.stride(), *pool_values.stride(), *value_norms.stride(), *strengths.stride(),
            rows, m, d, decay, budget, WRITE_THRESHOLD,
            TOPK=topk, HIDDEN=hidden, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=4)
        ctx.save_for_backward(row_scores, pool_values, value_norms, index, strength_rows, coefficients, miss_norms,
                              w1, b1, w2, b2, sharpness)
        ctx.constants = topk, decay, budget
        ctx.mark_non_differentiable(index, wrote)
        return index, strength_rows, wrote

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, _index, grad_strength_rows, _wrote):
        (row_scores, pool_values, value_norms, index, strength_rows, coefficients, miss_norms,
         w1, b1, w2, b2, sharpness) = ctx.saved_tensors
        topk, decay, budget = ctx.constants
        batch, rows, pool = row_scores.shape
        m, hidden = pool - rows, w1.shape[1]
        miss = pool_values[:, m:] - coefficients @ pool_values  # (b, R, d): value - predicted, each row
        grad_row_scores = torch.zeros(batch, rows, pool, dtype=row_scores.dtype, device=row_scores.device)
        grad_value_norms = torch.empty(batch, rows, dtype=row_scores.dtype, device=row_scores.device)
        miss_scales = torch.empty_like(grad_value_norms)
        grad_strengths = torch.empty(batch, m, dtype=row_scores.dtype, device=row_scores.device)
        grad_rule = torch.empty(batch, 5 * hidden + 2, dtype=row_scores.dtype, device=row_scores.device)
        triton_kernels("model.loop_kernel").backward_kernel[(batch,)](
            row_scores, value_norms, index, strength_rows, miss_norms, miss @ pool_values.mT,
            grad_strength_rows.contiguous(), grad_row_scores, grad_value_norms, miss_scales, grad_strengths, grad_rule,
            w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), sharpness,
            *row_scores.stride(), *value_norms.stride(), rows, m, decay, budget, WRITE_THRESHOLD,
            TOPK=topk, HIDDEN=hidden, BLOCK_M=next_power_of_2(m), num_warps=4)
        grad_miss = miss_scales[..., None] * miss  # d loss / d (value - predicted)
        grad_pool_values = -(coefficients.mT @ grad_miss)
        grad_pool_values[:, m:] += grad_miss
        summed = grad_rule.sum(0)
        grad_w1 = summed[:3 * hidden].view_as(w1)
        grad_b1 = summed[3 * hidden:4 * hidden].view_as(b1)
        grad_w2 = summed[4 * hidden:5 * hidden].view_as(w2)
        grad_b2 = summed[5 * hidden:5 * hidden + 1].view_as(b2)
        grad_sharpness = summed[-1:].view_as(sharpness) if topk else None
        return (grad_row_scores, grad_pool_values, grad_value_norms, grad_strengths, grad_w1, grad_b1, grad_w2,
                grad_b2, grad_sharpness, None, None, None)
