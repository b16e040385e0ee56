"""Fast memories: procedural (PM) and episodic (EM), their neuromodulators, and the span loop.

Both memories are a set of slots (key, value, strength). They are read at every position but
written only at span boundaries, from an eligibility trace (sums of keys and values over the
span), gated by a neuromodulator that learns when to learn. Writes decay all strengths, replace
the weakest slot, and rescale strengths to a norm budget, so a memory never grows.

Inside a span the memory is read-only, so everything except the tiny per-span write runs in
parallel over the sequence; `run_over_spans` is the only loop, and it touches (b, slots, d) tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

WRITE_THRESHOLD = 0.1  # a neuromodulator output below this skips the write entirely


class Slots(NamedTuple):
    keys: torch.Tensor  # (b, m, d), unit norm where used
    values: torch.Tensor  # (b, m, d)
    strengths: torch.Tensor  # (b, m), 0 = empty


class Trace(NamedTuple):
    """Eligibility trace of the span in progress: sums since its start."""

    keys: torch.Tensor  # (b, d)
    values: torch.Tensor  # (b, d)


class Segment(NamedTuple):
    start: int
    stop: int
    closes_span: bool | torch.Tensor  # a (b,) bool tensor when users sit at different span offsets


def span_segments(phase: int, length: int, span: int) -> list[Segment]:
    """Cut positions [0, length) where a span ends; `phase` = bytes already in the first span."""
    segments, start, in_span = [], 0, phase
    while start < length:
        stop = min(length, start + span - in_span)
        segments.append(Segment(start, stop, closes_span=(in_span + stop - start) == span))
        start, in_span = stop, 0
    return segments


class Neuromodulator(nn.Module):
    """Maps a span's (surprise, novelty, fill) to a write strength in (0, 1)."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, 0.5)  # starts by writing, strength ~0.62

    def forward(self, surprise: torch.Tensor, novelty: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """Each input (b,) -> write strength (b,)."""
        features = torch.stack([surprise, novelty, fill], dim=-1).to(self.net[0].weight.dtype)
        return torch.sigmoid(self.net(features)).squeeze(-1)


class PMNeuromodulator(Neuromodulator):
    """One per procedural-memory instance (per layer of every block)."""


class EMNeuromodulator(Neuromodulator):
    """One per episodic-memory instance (per block)."""


class SlotMemory(nn.Module):
    """Write rule shared by PM and EM; subclasses define how a read combines slots."""

    neuromodulator: Neuromodulator

    def __init__(self, decay: float, budget: float) -> None:
        super().__init__()
        self.decay = decay
        self.budget = budget

    def retrieve(self, queries: torch.Tensor, slots: Slots) -> torch.Tensor:
        """queries (b, t, d) -> retrieved values (b, t, d), in the space of the written values."""
        raise NotImplementedError

    def write(self, slots: Slots, trace: Trace, span: int) -> tuple[Slots, torch.Tensor]:
        """Write one item from a closed span's trace. Returns the new slots and (b,) write flags."""
        key = F.normalize(trace.keys, dim=-1)
        value = trace.values / span
        predicted = self.retrieve(key[:, None], slots)[:, 0]
        surprise = (value - predicted).norm(dim=-1) / (value.norm(dim=-1) + 1e-6)
        used = slots.strengths > 0
        similarity = torch.einsum("bd,bmd->bm", key, slots.keys).masked_fill(~used, -1.0)
        novelty = 1.0 - similarity.max(dim=-1).values.clamp(min=0.0)
        fill = used.to(value.dtype).mean(dim=-1)
        strength = self.neuromodulator(surprise, novelty, fill).to(value.dtype)
        writes = strength > WRITE_THRESHOLD

        decayed = slots.strengths * self.decay
        weakest = F.one_hot(decayed.argmin(dim=-1), decayed.shape[-1]).bool() & writes[:, None]
        keys = torch.where(weakest[..., None], key[:, None], slots.keys)
        values = torch.where(weakest[..., None], value[:, None], slots.values)
        strengths = torch.where(weakest, strength[:, None], decayed)
        total = strengths.sum(dim=-1, keepdim=True).clamp(min=1e-6)
        strengths = strengths * (self.budget / total).clamp(max=1.0)
        return Slots(keys, values, strengths), writes.long()


class ProceduralMemory(SlotMemory):
    """Low-rank fast-weight adapter: read = sum_i s_i (q . k_i) v_i, i.e. W_fast = V^T diag(s) K."""

    def __init__(self, decay: float, budget: float) -> None:
        super().__init__(decay, budget)
        self.neuromodulator = PMNeuromodulator()
        self.gain = nn.Parameter(torch.tensor(0.5))

    def retrieve(self, queries: torch.Tensor, slots: Slots) -> torch.Tensor:
        scores = torch.einsum("btd,brd->btr", queries, slots.keys) * slots.strengths[:, None, :]
        return torch.einsum("btr,brd->btd", scores, slots.values)

    def read(self, queries: torch.Tensor, slots: Slots) -> torch.Tensor:
        return self.gain * self.retrieve(queries, slots)


class EpisodicMemory(SlotMemory):
    """Itemised store: top-k retrieval by cosine similarity, aggregated by one-query cross-attention."""

    def __init__(self, d_model: int, topk: int, decay: float, budget: float) -> None:
        super().__init__(decay, budget)
        self.topk = topk
        self.query = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.log_temperature = nn.Parameter(torch.tensor(2.3))  # softmax sharpness, e^2.3 ~ 10
        self.neuromodulator = EMNeuromodulator()

    def queries(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (b, t, d) -> unit queries (b, t, d), also used as write keys."""
        return F.normalize(self.query(hidden), dim=-1)

    def retrieve(self, queries: torch.Tensor, slots: Slots) -> torch.Tensor:
        scores = torch.einsum("btd,bmd->btm", queries, slots.keys)
        used = (slots.strengths > 0)[:, None, :].expand_as(scores)
        # A finite floor, not -inf: softmax over all-empty rows must keep finite gradients.
        scores = scores.masked_fill(~used, -1e4)
        top_scores, top_index = scores.topk(self.topk, dim=-1)
        weights = torch.softmax(top_scores * self.log_temperature.exp(), dim=-1)
        weights = weights * used.gather(-1, top_index)  # empty slots contribute nothing
        dense = torch.zeros_like(scores).scatter(-1, top_index, weights)
        return torch.einsum("btm,bmd->btd", dense, slots.values)

    def read(self, queries: torch.Tensor, slots: Slots) -> torch.Tensor:
        return self.out(self.retrieve(queries, slots))


def run_over_spans(memory: SlotMemory, queries: torch.Tensor, values: torch.Tensor, slots: Slots,
                   trace: Trace, segments: list[Segment], span: int, learn: bool
                   ) -> tuple[torch.Tensor, Slots, Trace, torch.Tensor]:
    """Read `memory` at every position and write it at span ends.

    queries: (b, T, d) unit vectors, used both to read and as write keys; values: (b, T, d).
    Returns reads (b, T, d), the new slots and trace, and (b,) counts of writes made.
    """
    reads = []
    writes = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    for segment in segments:
        part = slice(segment.start, segment.stop)
        reads.append(memory.read(queries[:, part], slots))
        if not learn:
            continue
        trace = Trace(trace.keys + queries[:, part].sum(1), trace.values + values[:, part].sum(1))
        closes = segment.closes_span
        if closes is False:
            continue
        written, wrote = memory.write(slots, trace, span)
        empty = Trace(torch.zeros_like(trace.keys), torch.zeros_like(trace.values))
        if closes is True:
            slots, trace, writes = written, empty, writes + wrote
        else:  # only the users whose span ends here
            slots = Slots(*(_where_rows(closes, new, old) for new, old in zip(written, slots)))
            trace = Trace(*(_where_rows(closes, new, old) for new, old in zip(empty, trace)))
            writes = writes + wrote * closes
    return torch.cat(reads, dim=1), slots, trace, writes


def _where_rows(rows: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """rows (b,) bool -> `new` in those rows, `old` elsewhere."""
    return torch.where(rows.view(-1, *([1] * (new.dim() - 1))), new, old)
