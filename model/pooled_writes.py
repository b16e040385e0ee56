"""A training chunk's span loop on indexes into a pool of items, not on the slots themselves.

Why: in training every row of a chunk ends a span for every user, and a row's write in slot form
rewrites every slot of every user (`torch.where` over (b, m, d) keys and values), then the reads
stack a copy of the slots for every row: most of a training step's memory traffic, forward and
backward (bench/NOTES.md, sessions 7 and 8). But a slot only ever holds what it held when the
chunk began or an item written from one row's trace. So the slots at any row are m indexes into a
pool of m + R items (the given slots, then each written row's key and value), and the loop runs
on indexes and strengths (b, m): a row's scores are gathered from one product of every row's key
with the pool, its prediction reads the k values its read weighs. The reads of all rows are then
two products with the pool. Equal to the row-by-row loop (`write_slots` and reads of stacked
slots) up to rounding; tests/test_kernels.py checks values and gradients against the reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from model.memory import WRITE_THRESHOLD, Slots, Trace, WriteRule, read_weights, top_k_weights, write_strength


class PooledRun(NamedTuple):
    retrieved: torch.Tensor  # (b, S, P, d): each row's queries read from the slots as that row began
    slots: Slots  # after the written rows
    trace: Trace  # emptied: every written row ended its span
    writes: torch.Tensor  # (b,) writes made


def run_pooled(rule: WriteRule, slots: Slots, trace: Trace, query_grid: torch.Tensor, key_rows: torch.Tensor,
               value_rows: torch.Tensor, span: int) -> PooledRun:
    """Write rows that all end every user's span, and read every row of the grid.

    slots (b, m, d) of one memory (rule: its one instance); trace (b, d), the sums before row 0;
    query_grid (b, S, P, d); key_rows, value_rows (b, R, d): the sums of the R <= S rows written,
    the first R of the grid. Row s reads the slots after the writes of rows 0..s-1.
    """
    batch, m, d = slots.keys.shape
    written, rows = key_rows.shape[1], query_grid.shape[1]
    item_keys = F.normalize(torch.cat([key_rows[:, :1] + trace.keys[:, None], key_rows[:, 1:]], dim=1), dim=-1)
    item_values = torch.cat([value_rows[:, :1] + trace.values[:, None], value_rows[:, 1:]], dim=1) / span
    pool_keys = torch.cat([slots.keys, item_keys], dim=1)  # (b, m + R, d)
    pool_values = torch.cat([slots.values, item_values], dim=1)
    row_scores = item_keys @ pool_keys.mT  # (b, R, m + R): each written row's key against every item
    index = torch.arange(m, device=slots.keys.device).expand(batch, m)  # the item each slot holds
    strengths = slots.strengths
    indexes, strengths_by_row = [index], [strengths]
    writes = torch.zeros(batch, dtype=torch.long, device=slots.keys.device)
    for row in range(written):
        scores = row_scores[:, row].gather(-1, index)  # (b, m): as `write_slots`' key against the slots
        read_slots, weights = _read_selection(rule, scores, strengths)
        read_values = pool_values.gather(1, index.gather(-1, read_slots)[..., None].expand(-1, -1, d))
        predicted = (weights[..., None] * read_values).sum(1)
        value = item_values[:, row]
        surprise = (value - predicted).norm(dim=-1) / (value.norm(dim=-1) + 1e-6)
        used = strengths > 0
        novelty = 1.0 - scores.masked_fill(~used, -1.0).amax(dim=-1).clamp(min=0.0)
        fill = used.to(value.dtype).mean(dim=-1)
        strength = write_strength(rule, surprise[:, None], novelty[:, None], fill[:, None])[:, 0]
        wrote = strength > WRITE_THRESHOLD
        decayed = strengths * rule.decay
        weakest = torch.zeros_like(used).scatter_(-1, decayed.argmin(dim=-1, keepdim=True), wrote[:, None])
        index = torch.where(weakest, m + row, index)
        strengths = torch.where(weakest, strength[:, None], decayed)
        strengths = strengths * (rule.budget / strengths.sum(dim=-1, keepdim=True).clamp(min=1e-6)).clamp(max=1.0)
        writes = writes + wrote.long()
        indexes.append(index)
        strengths_by_row.append(strengths)
    index_rows = torch.stack(indexes[:rows], dim=1)[:, :, None, :].expand(-1, -1, query_grid.shape[2], -1)
    scores = (query_grid @ pool_keys[:, None].mT).gather(-1, index_rows)  # (b, S, P, m)
    weights = read_weights(scores, torch.stack(strengths_by_row[:rows], dim=1), rule.topk, rule.sharpness)
    pool_weights = torch.zeros(*scores.shape[:-1], m + written, dtype=weights.dtype, device=weights.device)
    retrieved = pool_weights.scatter(-1, index_rows, weights) @ pool_values[:, None]
    final = index[..., None].expand(-1, -1, d)
    emptied = Trace(torch.zeros_like(trace.keys), torch.zeros_like(trace.values))
    return PooledRun(retrieved, Slots(pool_keys.gather(1, final), pool_values.gather(1, final), strengths), emptied,
                     writes)


def _read_selection(rule: WriteRule, scores: torch.Tensor, strengths: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots a write's read weighs and their weights, (b, j) each: PM all m, EM its top k."""
    if rule.sharpness is None:
        return torch.arange(scores.shape[-1], device=scores.device).expand_as(scores), scores * strengths
    read_slots, weights = top_k_weights(scores[:, None], strengths, rule.topk, rule.sharpness[0])
    return read_slots[:, 0], weights[:, 0]
