"""Fast memories: procedural (PM) and episodic (EM), their neuromodulators, and the span loop.

Both memories are a set of slots (key, value, strength). They are read at every position but
written only at span boundaries, from an eligibility trace (sums of keys and values over the
span), gated by a neuromodulator that learns when to learn. Writes decay all strengths, replace
the weakest slot, and rescale strengths to a norm budget, so a memory never grows.

Inside a span the memory is read-only, so everything except the tiny per-span write runs in
parallel over the sequence. `run_over_spans` loops over spans only to write, on (b, slots, d)
tensors, keeping the slots each span started from; then it reads every position in one batched
call, each position against its own span's snapshot. `run_over_spans_reference` is the readable
loop (read a segment, then write) that the tests compare it against.
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
        return self.combine(queries @ slots.keys.transpose(1, 2), slots)

    def combine(self, scores: torch.Tensor, slots: Slots) -> torch.Tensor:
        """scores (b, t, m) of queries against the slot keys -> retrieved values (b, t, d)."""
        raise NotImplementedError

    def write(self, slots: Slots, trace: Trace, span: int, closes: torch.Tensor | None = None
              ) -> tuple[Slots, torch.Tensor]:
        """Write one item from a closed span's trace. Returns the new slots and (b,) write flags.

        closes: (b,) bool, the rows whose span ends (None: all); other rows come back unchanged.
        Decoding users at different span offsets write on most steps, so this runs once per
        memory per byte: it is written for few tensor operations (one score product shared by the
        prediction and the novelty, the row mask folded into the update), not for clarity alone.
        """
        key = F.normalize(trace.keys, dim=-1)
        value = trace.values / span
        scores = key[:, None] @ slots.keys.transpose(1, 2)  # (b, 1, m)
        predicted = self.combine(scores, slots)[:, 0]
        surprise = (value - predicted).norm(dim=-1) / (value.norm(dim=-1) + 1e-6)
        used = slots.strengths > 0
        novelty = 1.0 - scores[:, 0].masked_fill(~used, -1.0).amax(dim=-1).clamp(min=0.0)
        fill = used.to(value.dtype).mean(dim=-1)
        strength = self.neuromodulator(surprise, novelty, fill).to(value.dtype)
        writes = strength > WRITE_THRESHOLD
        decayed = slots.strengths * self.decay
        if closes is not None:
            writes = writes & closes
            decayed = torch.where(closes[:, None], decayed, slots.strengths)
        weakest = torch.zeros_like(used).scatter_(-1, decayed.argmin(dim=-1, keepdim=True), writes[:, None])
        keys = torch.where(weakest[..., None], key[:, None], slots.keys)
        values = torch.where(weakest[..., None], value[:, None], slots.values)
        strengths = torch.where(weakest, strength[:, None], decayed)
        scale = (self.budget / strengths.sum(dim=-1, keepdim=True).clamp(min=1e-6)).clamp(max=1.0)
        if closes is not None:
            scale = torch.where(closes[:, None], scale, 1.0)
        return Slots(keys, values, strengths * scale), writes.long()


class ProceduralMemory(SlotMemory):
    """Low-rank fast-weight adapter: read = sum_i s_i (q . k_i) v_i, i.e. W_fast = V^T diag(s) K."""

    def __init__(self, decay: float, budget: float) -> None:
        super().__init__(decay, budget)
        self.neuromodulator = PMNeuromodulator()
        self.gain = nn.Parameter(torch.tensor(0.5))

    def combine(self, scores: torch.Tensor, slots: Slots) -> torch.Tensor:
        return (scores * slots.strengths[:, None, :]) @ slots.values

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

    def combine(self, scores: torch.Tensor, slots: Slots) -> torch.Tensor:
        used = (slots.strengths > 0)[:, None, :].expand_as(scores)
        # A finite floor, not -inf: softmax over all-empty rows must keep finite gradients.
        scores = scores.masked_fill(~used, -1e4)
        top_scores, top_index = scores.topk(self.topk, dim=-1)
        weights = torch.softmax(top_scores * self.log_temperature.exp(), dim=-1)
        weights = weights * used.gather(-1, top_index)  # empty slots contribute nothing
        dense = torch.zeros_like(scores).scatter(-1, top_index, weights)
        return dense @ slots.values

    def read(self, queries: torch.Tensor, slots: Slots) -> torch.Tensor:
        return self.out(self.retrieve(queries, slots))


def run_over_spans(memory: SlotMemory, queries: torch.Tensor, values: torch.Tensor, slots: Slots,
                   trace: Trace, segments: list[Segment], span: int, learn: bool
                   ) -> tuple[torch.Tensor, Slots, Trace, torch.Tensor]:
    """Read `memory` at every position and write it at span ends.

    queries: (b, T, d) unit vectors, used both to read and as write keys; values: (b, T, d).
    Returns reads (b, T, d), the new slots and trace, and (b,) counts of writes made.

    Reads inside a segment see only the slots as they were at the segment's start, so the loop
    below runs just the write recurrence, collecting those snapshots, and all reads are one
    `memory.read` over (b * n_segments) rows of the span grid (`SpanGrid`). Without learning
    the slots never change: one read over the whole sequence. Equal to
    `run_over_spans_reference` up to rounding.
    """
    writes = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    if not learn:
        return memory.read(queries, slots), slots, trace, writes
    grid = SpanGrid.of(segments, queries.shape[1])
    if grid is None:  # segments that do not tile a span grid (never from span_segments)
        return run_over_spans_reference(memory, queries, values, slots, trace, segments, span, learn)
    query_grid = grid.fold(queries)  # (b, S, P, d)
    key_sums, value_sums = query_grid.sum(2), grid.fold(values).sum(2)  # (b, S, d) per segment
    snapshots = []
    for i, segment in enumerate(segments):
        snapshots.append(slots)
        trace = Trace(trace.keys + key_sums[:, i], trace.values + value_sums[:, i])
        slots, trace, writes = _close_span(memory, slots, trace, writes, segment.closes_span, span)
    if len(snapshots) == 1:
        reads = memory.read(queries, snapshots[0])
    else:
        stacked = Slots(*(torch.stack(parts, dim=1).flatten(0, 1) for parts in zip(*snapshots)))  # (b*S, m, ..)
        reads = grid.unfold(memory.read(query_grid.flatten(0, 1), stacked).unflatten(0, query_grid.shape[:2]))
    return reads, slots, trace, writes


def _close_span(memory: SlotMemory, slots: Slots, trace: Trace, writes: torch.Tensor,
                closes: bool | torch.Tensor, span: int) -> tuple[Slots, Trace, torch.Tensor]:
    """Write from the trace and empty it where a span closes; `closes` False leaves all as they are."""
    if closes is False:
        return slots, trace, writes
    if closes is True:
        written, wrote = memory.write(slots, trace, span)
        return written, Trace(torch.zeros_like(trace.keys), torch.zeros_like(trace.values)), writes + wrote
    # only the users whose span ends here
    written, wrote = memory.write(slots, trace, span, closes)
    keep = (~closes)[:, None].to(trace.keys.dtype)
    return written, Trace(trace.keys * keep, trace.values * keep), writes + wrote


class SpanGrid(NamedTuple):
    """Segments laid out as rows of a (S, P) grid: the first right-aligned, the others left-aligned.

    Valid when every segment but the first and the last is P long, which `span_segments` gives
    (P = span, except for a call shorter than one span). `lead` and `tail` are the padding.
    """

    segments: int  # S
    width: int  # P
    lead: int
    tail: int

    @classmethod
    def of(cls, segments: list[Segment], length: int) -> "SpanGrid | None":
        sizes = [s.stop - s.start for s in segments]
        width = max(sizes)
        if any(size != width for size in sizes[1:-1]):
            return None
        lead = width - sizes[0]
        return cls(len(sizes), width, lead, len(sizes) * width - lead - length)

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, T, ...) -> (b, S, P, ...), zeros in the padding."""
        if self.lead or self.tail:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (self.lead, self.tail))
        return x.unflatten(1, (self.segments, self.width))

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """(b, S, P, ...) -> (b, T, ...), padding dropped."""
        x = x.flatten(1, 2)
        return x[:, self.lead:x.shape[1] - self.tail]


def run_over_spans_reference(memory: SlotMemory, queries: torch.Tensor, values: torch.Tensor, slots: Slots,
                             trace: Trace, segments: list[Segment], span: int, learn: bool
                             ) -> tuple[torch.Tensor, Slots, Trace, torch.Tensor]:
    """The readable loop `run_over_spans` must equal: read a segment, then write if it closes a span.

    Same arguments and results as `run_over_spans`.
    """
    reads = []
    writes = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    for segment in segments:
        part = slice(segment.start, segment.stop)
        reads.append(memory.read(queries[:, part], slots))
        if learn:
            trace = Trace(trace.keys + queries[:, part].sum(1), trace.values + values[:, part].sum(1))
            slots, trace, writes = _close_span(memory, slots, trace, writes, segment.closes_span, span)
    return torch.cat(reads, dim=1), slots, trace, writes

