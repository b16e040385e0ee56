"""A training chunk's span loop on indexes into a pool of items, not on the slots themselves.

Why: in training every row of a chunk ends a span for every user, and a row's write in slot form
rewrites every slot of every user (`torch.where` over (b, m, d) keys and values), then the reads
stack a copy of the slots for every row, forward and backward. But a slot only ever holds what it
held when the chunk began or an item written from one row's trace. So the slots at any row are m indexes into a
pool of m + R items (the given slots, then each written row's key and value), and the loop runs
on indexes and strengths (b, m): a row's scores are gathered from one product of every row's key
with the pool, its prediction reads the k values its read weighs. The reads of all rows are then
two products with the pool (`SlotMemory.read_pool`). On a CPU this halved the loop's bytes and,
with fewer ops a row, took a quarter of the kernels out of a training step (bench/NOTES.md,
session 11). Equal to the row-by-row loop (`write_slots` and reads of stacked slots) up to
rounding; tests/test_kernels.py checks values and gradients against the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from model.fused_loop import LoopRows, fused_loop_rows, fused_loop_supported
from model.memory import WRITE_THRESHOLD, Slots, Trace, WriteRule, top_k_weights, write_strength


class PooledRun(NamedTuple):
    pool_keys: torch.Tensor  # (b, m + R, d): the given slots' keys, then each written row's
    pool_values: torch.Tensor  # (b, m + R, d)
    read_index: torch.Tensor  # (b, S, m): the item each slot holds as row s begins, for S rows
    read_strengths: torch.Tensor  # (b, S, m)
    slots: Slots  # after the written rows
    trace: Trace  # emptied: every written row ended its span
    writes: torch.Tensor  # (b,) writes made


class RowResult(NamedTuple):
    index: torch.Tensor  # (b, m): the item each slot holds after the row
    strengths: torch.Tensor  # (b, m)
    wrote: torch.Tensor  # (b,) bool


def run_pooled(rule: WriteRule, slots: Slots, trace: Trace, rows: int, key_rows: torch.Tensor,
               value_rows: torch.Tensor, span: int, row_step: Callable[..., RowResult] | None = None) -> PooledRun:
    """Write rows that all end every user's span; return what each of `rows` rows reads from.

    slots (b, m, d) of one memory (rule: its one instance); trace (b, d), the sums before row 0;
    key_rows, value_rows (b, R, d): the sums of the R <= rows rows written. Row s reads the slots
    after the writes of rows 0..s-1: `SlotMemory.read_pool` reads them from the pool, one product
    for all rows (a separate piece, so `ReverieLM.compile_layers` fuses it with the memory's
    output). row_step: what runs each row, `pooled_row` unless given (`model.memory.compiled_writes`
    gives it compiled).
    """
    batch, m, d = slots.keys.shape
    item_keys = F.normalize(torch.cat([key_rows[:, :1] + trace.keys[:, None], key_rows[:, 1:]], dim=1), dim=-1)
    item_values = torch.cat([value_rows[:, :1] + trace.values[:, None], value_rows[:, 1:]], dim=1) / span
    pool_keys = torch.cat([slots.keys, item_keys], dim=1)  # (b, m + R, d)
    pool_values = torch.cat([slots.values, item_values], dim=1)
    row_scores = item_keys @ pool_keys.mT  # (b, R, m + R): each written row's key against every item
    value_norms = item_values.norm(dim=-1) + 1e-6  # (b, R): surprise's denominators
    if fused_loop_supported(pool_values):
        loop = fused_loop_rows(rule, row_scores, pool_values, value_norms, slots.strengths)
    else:
        loop = torch_loop_rows(rule, row_scores, pool_values, item_values, value_norms, slots.strengths, row_step)
    final = loop.index[:, -1, :, None].expand(-1, -1, d)
    emptied = Trace(torch.zeros_like(trace.keys), torch.zeros_like(trace.values))
    return PooledRun(pool_keys, pool_values, loop.index[:, :rows], loop.strengths[:, :rows],
                     Slots(pool_keys.gather(1, final), pool_values.gather(1, final), loop.strengths[:, -1]),
                     emptied, loop.wrote.sum(dim=1))


def torch_loop_rows(rule: WriteRule, row_scores: torch.Tensor, pool_values: torch.Tensor, item_values: torch.Tensor,
                    value_norms: torch.Tensor, strengths: torch.Tensor, row_step: Callable[..., RowResult] | None
                    ) -> LoopRows:
    """The loop in torch, a `row_step` (default `pooled_row`) a row: what `fused_loop_rows` does."""
    batch, m = strengths.shape
    index = torch.arange(m, device=strengths.device).expand(batch, m)  # the item each slot holds
    pool_slots = torch.arange(m, pool_values.shape[1], device=strengths.device)  # where each row's item sits
    indexes, strengths_by_row, wrote_by_row = [index], [strengths], []
    for row in range(row_scores.shape[1]):
        index, strengths, wrote = (row_step or pooled_row)(
            rule, row_scores[:, row], pool_values, item_values[:, row], value_norms[:, row], pool_slots[row], index,
            strengths)
        indexes.append(index)
        strengths_by_row.append(strengths)
        wrote_by_row.append(wrote)
    return LoopRows(torch.stack(indexes, dim=1), torch.stack(strengths_by_row, dim=1), torch.stack(wrote_by_row, 1))


def pooled_row(rule: WriteRule, row_scores: torch.Tensor, pool_values: torch.Tensor, value: torch.Tensor,
               value_norm: torch.Tensor, item: torch.Tensor, index: torch.Tensor, strengths: torch.Tensor
               ) -> RowResult:
    """One row's write, as `write_slots` on the slots `index` points at: row_scores (b, m + R), its
    item's key against the pool; pool_values (b, m + R, d); value (b, d) and value_norm (b,) + 1e-6,
    its item's; item, its place in the pool (a 0-d tensor); index, strengths (b, m) before it."""
    scores = row_scores.gather(-1, index)  # (b, m): as `write_slots`' key against the slots
    used = strengths > 0
    read_items, weights = _read_selection(rule, scores, strengths, used, index)
    read_values = pool_values.gather(1, read_items[..., None].expand(-1, -1, pool_values.shape[-1]))
    predicted = (weights[..., None] * read_values).sum(1)
    surprise = (value - predicted).norm(dim=-1) / value_norm
    novelty = 1.0 - scores.masked_fill(~used, -1.0).amax(dim=-1).clamp(min=0.0)
    fill = used.to(predicted.dtype).mean(dim=-1)
    strength = write_strength(rule, surprise[:, None], novelty[:, None], fill[:, None])[:, 0]
    wrote = strength > WRITE_THRESHOLD
    decayed = strengths * rule.decay
    weakest = torch.zeros_like(used).scatter_(-1, decayed.argmin(dim=-1, keepdim=True), wrote[:, None])
    strengths = torch.where(weakest, strength[:, None], decayed)
    strengths = strengths * (rule.budget / strengths.sum(dim=-1, keepdim=True).clamp(min=1e-6)).clamp(max=1.0)
    return RowResult(torch.where(weakest, item, index), strengths, wrote)


def _read_selection(rule: WriteRule, scores: torch.Tensor, strengths: torch.Tensor, used: torch.Tensor,
                    index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool items a write's read weighs and their weights, (b, j) each: PM all m slots, EM
    its top k. scores, strengths, used: the slots' (b, m); index: the item each slot holds."""
    if rule.sharpness is None:
        return index, scores * strengths
    top_slots, weights = top_k_weights(scores[:, None], used, rule.topk, rule.sharpness[0])
    return index.gather(-1, top_slots[:, 0]), weights[:, 0]
