"""Fast memories: procedural (PM) and episodic (EM), their neuromodulators, and the span loop.

Both memories are a set of slots (key, value, strength). They are read at every position but
written only at span boundaries, from an eligibility trace (sums of keys and values over the
span), gated by a neuromodulator that learns when to learn. Writes decay all strengths, replace
the weakest slot, and rescale strengths to a norm budget, so a memory never grows.

Inside a span the memory is read-only, so everything except the tiny per-span write runs in
parallel over the sequence. `run_over_spans` loops over spans only to write, on (b, slots, d)
tensors, keeping the slots each span started from; then it reads every position in one batched
call, each position against its own span's snapshot. A training chunk, whose every row ends every
user's span, runs that loop on indexes into a pool of items instead (model/pooled_writes.py). Users may sit at different offsets inside
their spans (`SpanPlan` lines their spans up). `run_over_spans_reference` is the readable loop
(one user at a time: read a segment, then write) that the tests compare it against.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
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
    closes_span: bool


def span_segments(phase: int, length: int, span: int) -> list[Segment]:
    """Cut positions [0, length) where a span ends; `phase` = bytes already in the first span."""
    segments, start, in_span = [], 0, phase
    while start < length:
        stop = min(length, start + span - in_span)
        segments.append(Segment(start, stop, closes_span=(in_span + stop - start) == span))
        start, in_span = stop, 0
    return segments


Closes = bool | torch.Tensor  # everyone's span ends (True), nobody's (False), or a (b,) bool mask


class Fold(NamedTuple):
    """A fold of (b, T, d) into rows of spans that is the same for every user: pad `lead` zeros
    before and `tail` after, then reshape to (b, rows, width, d)."""

    lead: int
    tail: int
    rows: int
    width: int


def fold_uniformly(x: torch.Tensor, fold: Fold) -> torch.Tensor:
    if fold.lead or fold.tail:
        x = F.pad(x, (0, 0, fold.lead, fold.tail))
    return x.unflatten(1, (fold.rows, fold.width))


def span_sums(queries: torch.Tensor, values: torch.Tensor, fold: Fold | None) -> Trace | None:
    """Each row's sums of queries and values, (b, S, d) each, for `run_over_spans`; None without a
    uniform fold. Computed inside the compiled piece that makes the queries (`Layer.mix`,
    `Block.memory_inputs`): the sums' backward then joins the queries' other gradient in that
    piece's backward kernels, where eagerly it was an expand and an add of (b, T, d) float32 per
    memory, and the forward sums two more passes (H200, session 13)."""
    if fold is None:
        return None
    return Trace(fold_uniformly(queries, fold).sum(2), fold_uniformly(values, fold).sum(2))


@dataclass(frozen=True)
class SpanPlan:
    """Where each user's spans end in one call of `length` bytes, laid out as S rows of P columns.

    User i's bytes start at column `leads[i]` of row 0, so every row boundary is a span boundary
    for every user, whatever their offset inside a span: reads of a row see the slots as they were
    at the row's start, and `closes[s]` says whose span ends with row s. Every row but the first
    and the last holds a whole span. When all users share an offset (training, or users served in
    step), folding into the grid is a reshape; otherwise a gather through `_fold_index`. Users may
    bring fewer bytes than T (prompts of different lengths, right-padded): their bytes past their
    own length fold to zeros, so they add nothing to a trace and end no span.
    """

    length: int  # T
    width: int  # P
    leads: tuple[int, ...]
    closes: tuple[Closes, ...]  # one per row
    lengths: tuple[int, ...]  # each user's bytes (<= T; the rest of its row is padding)
    _fold_index: torch.Tensor | None = None  # (b*S*P,) row of the padded, flattened input; T = zeros
    _unfold_index: torch.Tensor | None = None  # (b*T,) row of the flattened grid holding each byte

    @classmethod
    def of(cls, phases: list[int], length: int, span: int, device: torch.device | str = "cpu",
           lengths: list[int] | None = None) -> "SpanPlan":
        """The plan for users at `phases` (bytes already in their current span) reading `length`
        bytes each, or `lengths[i]` bytes of a `length`-long right-padded batch."""
        lengths = [length] * len(phases) if lengths is None else list(lengths)
        if (not phases or length < 1 or any(not 0 <= phase < span for phase in phases)
                or len(lengths) != len(phases) or any(not 1 <= n <= length for n in lengths)):
            raise ValueError(f"a span plan needs >= 1 user at phases in [0, {span}) and lengths in [1, {length}], "
                             f"got phases {phases} and lengths {lengths}")
        per_user = [span_segments(phase, n, span) for phase, n in zip(phases, lengths)]
        rows = max(len(segments) for segments in per_user)
        sizes = [segment.stop - segment.start for segments in per_user for segment in segments]
        width = span if any(len(segments) > 2 for segments in per_user) else max(sizes)
        leads = tuple(width - (segments[0].stop - segments[0].start) for segments in per_user)
        closes = tuple(_collapse([segments[s].closes_span if s < len(segments) else False
                                  for segments in per_user], device) for s in range(rows))
        if len(set(leads)) == 1 and min(lengths) == length:
            return cls(length, width, leads, closes, tuple(lengths))
        # Row-wise copies through index_select on flattened tensors: much faster than a gather.
        users = torch.arange(len(phases), device=device)[:, None]
        lead = torch.tensor(leads, device=device)[:, None]
        source = torch.arange(rows * width, device=device) - lead
        own = torch.tensor(lengths, device=device)[:, None]
        fold_index = torch.where((source >= 0) & (source < own), source, length) + users * (length + 1)
        cell = (torch.arange(length, device=device) + lead).clamp(max=rows * width - 1)  # padding: any cell
        return cls(length, width, leads, closes, tuple(lengths), fold_index.flatten(),
                   (cell + users * (rows * width)).flatten())

    @classmethod
    def one_byte(cls, closes: Closes, batch: int) -> "SpanPlan":
        """One byte per user with whose span it ends given, e.g. as a mask computed on the device."""
        return cls(1, 1, (0,) * batch, (closes,), (1,) * batch)

    @property
    def rows(self) -> int:
        return len(self.closes)

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, T, d) -> (b, S, P, d), zeros in the padding."""
        if self._fold_index is None:
            return fold_uniformly(x, self.uniform_fold())
        x = F.pad(x, (0, 0, 0, 1)).flatten(0, 1).index_select(0, self._fold_index).unflatten(0, (x.shape[0], -1))
        return x.unflatten(1, (self.rows, self.width))

    def uniform_fold(self) -> Fold | None:
        """The fold as plain numbers when every user folds alike (a reshape, maybe padded), else
        None: what a compiled piece needs to fold and sum inside itself (`span_sums`)."""
        if self._fold_index is not None:
            return None
        return Fold(self.leads[0], self.rows * self.width - self.leads[0] - self.length, self.rows, self.width)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """(b, S, P, d) -> (b, T, d), padding dropped (a user's positions past its length: any value)."""
        x = x.flatten(1, 2)
        if self._unfold_index is None:
            return x[:, self.leads[0]:self.leads[0] + self.length]
        return x.flatten(0, 1).index_select(0, self._unfold_index).unflatten(0, (x.shape[0], self.length))

    def segments(self, user: int) -> list[Segment]:
        """User `user`'s bytes cut where its spans end (what `span_segments` gives for its phase)."""
        cut = []
        for row, closes in enumerate(self.closes):
            start = max(0, row * self.width - self.leads[user])
            stop = min(self.lengths[user], (row + 1) * self.width - self.leads[user])
            if start < stop:
                cut.append(Segment(start, stop, closes if isinstance(closes, bool) else bool(closes[user])))
        return cut


def _collapse(flags: list[bool], device: torch.device | str) -> Closes:
    """A plain bool when every user agrees (known on the host: no masked write), else a mask."""
    if all(flags) or not any(flags):
        return flags[0]
    return torch.tensor(flags, device=device)


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


class WriteRule(NamedTuple):
    """What a write needs from one memory or a stack of like memories: their parameters stacked
    as plain tensors (instance dim first), and the constants they share."""

    w1: torch.Tensor  # (n, hidden, 3): the neuromodulators' layers, stacked
    b1: torch.Tensor  # (n, hidden)
    w2: torch.Tensor  # (n, 1, hidden)
    b2: torch.Tensor  # (n, 1)
    sharpness: torch.Tensor | None  # (n, 1, 1): EM's softmax sharpness; None: PM's weighted read
    topk: int  # EM's items per read (0 for PM)
    decay: float
    budget: float


def one_query_compiled(queries: torch.Tensor) -> bool:
    """Whether a read's products run spelled out: one query a row without autograd (decoding),
    under torch.compile. As a product with the slots, cuBLAS runs each as a batched GEMV of its
    own, two launches a PM read and one for EM's scores (H200, `base`, 64 users, compiled: 36 of
    the step's 294 kernels, where PM's bytes take under a microsecond a layer); as products and
    sums inductor fuses them with the ops around them (session 24: 278 kernels, and decoding at
    b=1-64 2-15% faster than session 19's step). Eagerly the GEMV is one launch against two; with
    autograd (training's and the sleep's compiled writes) the products stay, as they were timed."""
    return queries.shape[-2] == 1 and not torch.is_grad_enabled() and torch.compiler.is_compiling()


def slot_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """queries (..., t, d) against slot keys (..., m, d) -> (..., t, m)."""
    if one_query_compiled(queries):
        return (queries * keys).sum(-1)[..., None, :]
    return queries @ keys.mT


def strength_weighted_combine(scores: torch.Tensor, slots: Slots) -> torch.Tensor:
    """PM's read: sum_i s_i (q . k_i) v_i. scores (..., t, m) -> (..., t, d)."""
    weights = scores * slots.strengths[..., None, :]
    if one_query_compiled(scores):
        return (weights.mT * slots.values).sum(-2, keepdim=True)
    return weights @ slots.values


def top_k_weights(scores: torch.Tensor, used: torch.Tensor, topk: int, sharpness: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """EM's read weights: a softmax over the top-k used slots. scores (..., t, m), used (..., m)
    (strengths > 0) -> the slots read (..., t, k) and their weights (..., t, k), 0 for empty slots."""
    used = used[..., None, :].expand_as(scores)
    # A finite floor, not -inf: softmax over all-empty rows must keep finite gradients.
    floored = scores.masked_fill(~used, -1e4)
    top_scores, top_index = _top_k_by_max(floored, topk) if torch.compiler.is_compiling() else floored.topk(topk, -1)
    weights = torch.softmax(top_scores * sharpness, dim=-1)
    return top_index, weights * used.gather(-1, top_index)  # empty slots contribute nothing


def _top_k_by_max(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores.topk(k, -1)` as k rounds of max, for torch.compile: a reduction a round, which
    inductor generates, where topk runs a sort-based kernel (H200, session 13: EM's top 4 of 288
    items took 2.2 ms of a `base` training step; with this the sort kernels left the profile and
    the step went from 99.0 to 94.4 ms, with the span sums' change). Eagerly topk is one kernel
    against 2k, so it stays. Ties may come in another order; only
    floored (empty) slots tie, and they weigh nothing. The taken item is masked by a scatter: as
    `torch.where(arange == index, ...)` inductor miscompiled `pooled_row` on a CPU (torch 2.13,
    static shapes: a row's written item came out as the slot's own index; test_kernels' compiled
    writes test caught it)."""
    values, indexes = [], []
    for _ in range(k):
        value, index = scores.max(dim=-1, keepdim=True)
        values.append(value)
        indexes.append(index)
        scores = scores.scatter(-1, index, float("-inf"))
    return torch.cat(values, dim=-1), torch.cat(indexes, dim=-1)


def read_weights(scores: torch.Tensor, strengths: torch.Tensor, topk: int, sharpness: torch.Tensor | None
                 ) -> torch.Tensor:
    """Each slot's weight in a read (PM's when sharpness is None, else EM's), dense: (..., t, m)."""
    if sharpness is None:
        return scores * strengths[..., None, :]
    top_index, weights = top_k_weights(scores, strengths > 0, topk, sharpness)
    return torch.zeros_like(scores).scatter(-1, top_index, weights)


def top_k_combine(scores: torch.Tensor, slots: Slots, topk: int, sharpness: torch.Tensor) -> torch.Tensor:
    """EM's read: a softmax over the top-k used slots. scores (..., t, m) -> (..., t, d)."""
    if scores.shape[-2] == 1:  # one query a row: read its k values, not all m through zero weights
        top_index, weights = top_k_weights(scores, slots.strengths > 0, topk, sharpness)
        index = top_index.mT.expand(*top_index.shape[:-2], topk, slots.values.shape[-1])
        return (weights.mT * slots.values.gather(-2, index)).sum(-2, keepdim=True)
    return read_weights(scores, slots.strengths, topk, sharpness) @ slots.values


def write_strength(rule: WriteRule, surprise: torch.Tensor, novelty: torch.Tensor, fill: torch.Tensor
                   ) -> torch.Tensor:
    """The neuromodulators of a rule's n instances: each input (b, n) -> write strength (b, n).
    Instance-major products with their biases (`baddbmm`): 5 ops, where a training chunk runs
    this once per row and memory."""
    features = torch.stack([surprise, novelty, fill], dim=-1).transpose(0, 1).to(rule.w1.dtype)  # (n, b, 3)
    hidden = F.silu(torch.baddbmm(rule.b1[:, None], features, rule.w1.mT))  # (n, b, hidden)
    return torch.sigmoid(torch.baddbmm(rule.b2[:, None], hidden, rule.w2.mT))[..., 0].T.to(surprise.dtype)


def write_slots(rule: WriteRule, slots: Slots, trace: Trace, span: int, closes: torch.Tensor | None = None
                ) -> tuple[Slots, torch.Tensor]:
    """Write one item from a closed span's trace. Returns the new slots and write flags.

    Shapes: slots (b, n, m, d) and trace (b, n, d) for a rule of n stacked instances, the layout of
    the FastState; or (b, m, d) and (b, d) for a rule of one. closes: (b,) bool, the rows whose
    span ends (None: all); other rows come back unchanged. Decoding users at different span
    offsets write on most steps, so this is written for few tensor operations (one score product
    shared by the prediction and the novelty, the row mask folded into the update).
    """
    if slots.keys.dim() == 3:  # one memory: give it the instance dim
        written, writes = write_slots(rule, Slots(*(t[:, None] for t in slots)), Trace(*(t[:, None] for t in trace)),
                                      span, closes)
        return Slots(*(t[:, 0] for t in written)), writes[:, 0]
    key = F.normalize(trace.keys, dim=-1)
    value = trace.values / span
    scores = slot_scores(key[..., None, :], slots.keys)  # (b, n, 1, m)
    if rule.sharpness is None:
        read = strength_weighted_combine(scores, slots)
    else:
        read = top_k_combine(scores, slots, rule.topk, rule.sharpness)
    predicted = read[..., 0, :]
    surprise = (value - predicted).norm(dim=-1) / (value.norm(dim=-1) + 1e-6)
    used = slots.strengths > 0
    novelty = 1.0 - scores[..., 0, :].masked_fill(~used, -1.0).amax(dim=-1).clamp(min=0.0)
    fill = used.to(value.dtype).mean(dim=-1)
    strength = write_strength(rule, surprise, novelty, fill)
    writes = strength > WRITE_THRESHOLD
    decayed = slots.strengths * rule.decay
    if closes is not None:
        writes = writes & closes[:, None]
        decayed = torch.where(closes[:, None, None], decayed, slots.strengths)
    weakest = torch.zeros_like(used).scatter_(-1, decayed.argmin(dim=-1, keepdim=True), writes[..., None])
    keys = torch.where(weakest[..., None], key[..., None, :], slots.keys)
    values = torch.where(weakest[..., None], value[..., None, :], slots.values)
    strengths = torch.where(weakest, strength[..., None], decayed)
    scale = (rule.budget / strengths.sum(dim=-1, keepdim=True).clamp(min=1e-6)).clamp(max=1.0)
    if closes is not None:
        scale = torch.where(closes[:, None, None], scale, 1.0)
    return Slots(keys, values, strengths * scale), writes.long()


_autograd_write = write_slots  # what `close_spans` runs where the fused kernels cannot: see compiled_writes
_pooled_row = None  # the row step of rows that all end a span (None: model.pooled_writes.pooled_row itself)
_pooled_loop = None  # all those rows (None: model.pooled_writes.run_pooled, with `_pooled_row`)


_held_rules: dict[str, WriteRule] = {}  # see rules_held


@contextmanager
def rules_held(rules: Mapping[str, WriteRule]) -> Iterator[None]:
    """Inside: `SlotMemory.stacked_rule` of a kind's memories, as many as `rules[kind name]` stacks,
    returns that rule instead of stacking the parameters. A decode step captured in a CUDA graph
    (model/decode_graph.py) holds its rules this way, in tensors at fixed addresses that it stacks
    again from the parameters whenever it loads a batch: replays read weights loaded in place since
    (a new version, a user's delta), and the step itself runs none of the ~10 stacks a rule takes
    (9 kernels of a 322-kernel step of `base`, H200 profile, session 19)."""
    global _held_rules
    previous, _held_rules = _held_rules, dict(rules)
    try:
        yield
    finally:
        _held_rules = previous


@contextmanager
def compiled_writes(enabled: bool = True, backend: str = "inductor", loops: bool = False) -> Iterator[None]:
    """Inside: the writes that need autograd (training; the fused kernels have no backward) run
    compiled, forward and backward a few fused kernels instead of dozens of small tensor ops, for
    each of the (spans x memories) writes of a training step: a training chunk's rows through
    `torch.compile(model.pooled_writes.pooled_row)`, other writes through `torch.compile(write_slots)`.
    One compile per shape (PM and EM of a preset), shared by every layer.
    loops=True also compiles the span loop of rows that all end a span (a training chunk's,
    `model.pooled_writes.run_pooled`) as one function: its rows unrolled, so far fewer kernels, at
    the price of a compile that grows with the rows. Process-wide while inside, like the compiled
    functions themselves; enabled=False changes nothing."""
    global _autograd_write, _pooled_row, _pooled_loop
    previous = _autograd_write, _pooled_row, _pooled_loop
    if enabled:
        from model.pooled_writes import pooled_row, run_pooled  # that module imports this one

        _autograd_write = _compiled(write_slots, backend)
        _pooled_row = _compiled(pooled_row, backend)
        _pooled_loop = _compiled(run_pooled, backend) if loops else None
    try:
        yield
    finally:
        _autograd_write, _pooled_row, _pooled_loop = previous


@functools.cache
def _compiled(fn, backend: str):
    """One compiled `fn` per backend for the process: a new torch.compile wrapper would compile again."""
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)


class SlotMemory(nn.Module):
    """Write rule shared by PM and EM; subclasses define how a read combines slots."""

    neuromodulator: Neuromodulator

    def __init__(self, decay: float, budget: float) -> None:
        super().__init__()
        self.decay = decay
        self.budget = budget

    def read(self, queries: torch.Tensor, slots: Slots) -> torch.Tensor:
        """queries (b, t, d) -> what the memory adds to the stream (b, t, d)."""
        return self.output(self.retrieve(queries, slots))

    def retrieve(self, queries: torch.Tensor, slots: Slots) -> torch.Tensor:
        """queries (b, t, d) -> retrieved values (b, t, d), in the space of the written values."""
        return self.combine(slot_scores(queries, slots.keys), slots)

    def output(self, retrieved: torch.Tensor) -> torch.Tensor:
        """Retrieved values (..., d) -> what the read adds to the stream."""
        raise NotImplementedError

    def read_pool(self, query_grid: torch.Tensor, pool_keys: torch.Tensor, pool_values: torch.Tensor,
                  index: torch.Tensor, strengths: torch.Tensor) -> torch.Tensor:
        """A training chunk's reads from a pool of items (model/pooled_writes.py): query_grid
        (b, S, P, d); pool_keys, pool_values (b, n, d); index, strengths (b, S, m), the item each
        slot holds as row s begins and its strength -> what the reads add to the stream (b, S, P, d).

        The grid's rows are flattened into one product with the pool: a product broadcast over the
        rows (pool[:, None]) would copy the pool once a row, forward and backward (EM at `base`:
        451 MB). The pool is padded with empty items to a multiple of 8: with n = m + R odd (PM at
        `base`: 39), cuBLAS ran these float32 products as unaligned sm80 kernels (`align1`; H200,
        session 13: the step's batched products took 10.2 ms of 110, padded 6.2 ms in sm90
        kernels). Padded items are never gathered, so they weigh nothing.
        """
        padding = -pool_keys.shape[1] % 8
        pool_keys, pool_values = (F.pad(t, (0, 0, 0, padding)) for t in (pool_keys, pool_values))
        rows, width = query_grid.shape[1:3]
        index_rows = index[:, :, None, :].expand(-1, -1, width, -1)
        pool_scores = (query_grid.flatten(1, 2) @ pool_keys.mT).unflatten(1, (rows, width))
        sharpness, topk = self._read_rule([self])
        weights = read_weights(pool_scores.gather(-1, index_rows), strengths, topk, sharpness)
        pool_weights = torch.zeros_like(pool_scores).scatter(-1, index_rows, weights)
        return self.output((pool_weights.flatten(1, 2) @ pool_values).unflatten(1, (rows, width)))

    def combine(self, scores: torch.Tensor, slots: Slots) -> torch.Tensor:
        """scores (b, t, m) of queries against the slot keys -> retrieved values (b, t, d)."""
        raise NotImplementedError

    @classmethod
    def stacked_rule(cls, memories: list["SlotMemory"]) -> WriteRule:
        """One write rule for like memories (or one), so their writes run as one `write_slots`.
        Without autograd (serving decodes a byte at a time) the rule is kept and built again only
        when a parameter changed (a new version, a delta, a move): its stacks are ~10 small ops.
        Inside `rules_held` (a CUDA graph's capture) the held rule is used."""
        held = _held_rules.get(cls.__name__)
        if held is not None and held.w1.shape[0] == len(memories):
            return held
        if torch.is_grad_enabled():
            return cls._build_rule(memories)
        ids = list(map(id, memories))
        cached = memories[0].__dict__.get("_cached_rule")  # (memories, their parameters, versions, rule)
        if cached is None or cached[0] != ids:
            parameters = [p for m in memories for p in (*m.neuromodulator.parameters(), *m.rule_parameters())]
            cached = (ids, parameters, None, None)
        versions = [(p.data_ptr(), p._version) for p in cached[1]]
        if versions != cached[2]:
            cached = (cached[0], cached[1], versions, cls._build_rule(memories))
            memories[0].__dict__["_cached_rule"] = cached
        return cached[3]

    @classmethod
    def _build_rule(cls, memories: list["SlotMemory"]) -> WriteRule:
        w1, b1, w2, b2 = (torch.stack([getattr(m.neuromodulator.net[layer], name) for m in memories])
                          for layer, name in ((0, "weight"), (0, "bias"), (2, "weight"), (2, "bias")))
        return WriteRule(w1, b1, w2, b2, *cls._read_rule(memories), _shared(memories, "decay"),
                         _shared(memories, "budget"))

    @classmethod
    def _read_rule(cls, memories: list["SlotMemory"]) -> tuple[torch.Tensor | None, int]:
        """The (sharpness, topk) of a stack's reads in `WriteRule`."""
        raise NotImplementedError

    def rule_parameters(self) -> tuple[nn.Parameter, ...]:
        """Parameters `_read_rule` reads, besides the neuromodulator's."""
        return ()


def _shared(memories: list[SlotMemory], name: str) -> float:
    values = {getattr(memory, name) for memory in memories}
    if len(values) != 1:
        raise ValueError(f"memories written together must share {name}, got {sorted(values)}")
    return values.pop()


class ProceduralMemory(SlotMemory):
    """Low-rank fast-weight adapter: read = sum_i s_i (q . k_i) v_i, i.e. W_fast = V^T diag(s) K."""

    def __init__(self, decay: float, budget: float) -> None:
        super().__init__(decay, budget)
        self.neuromodulator = PMNeuromodulator()
        self.gain = nn.Parameter(torch.tensor(0.5))

    def combine(self, scores: torch.Tensor, slots: Slots) -> torch.Tensor:
        return strength_weighted_combine(scores, slots)

    def output(self, retrieved: torch.Tensor) -> torch.Tensor:
        return self.gain * retrieved

    @classmethod
    def _read_rule(cls, memories: list[SlotMemory]) -> tuple[torch.Tensor | None, int]:
        return None, 0


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
        return top_k_combine(scores, slots, self.topk, self.log_temperature.exp())

    def output(self, retrieved: torch.Tensor) -> torch.Tensor:
        return self.out(retrieved)

    def rule_parameters(self) -> tuple[nn.Parameter, ...]:
        return (self.log_temperature,)

    @classmethod
    def _read_rule(cls, memories: list[SlotMemory]) -> tuple[torch.Tensor | None, int]:
        sharpness = torch.stack([m.log_temperature for m in memories]).exp()[:, None, None]
        return sharpness, _shared(memories, "topk")


class SpanRun(NamedTuple):
    """What `run_over_spans` returns."""

    reads: torch.Tensor  # (b, T, d)
    slots: Slots
    trace: Trace
    writes: torch.Tensor  # (b,) writes made
    pending: Trace | None  # close_last=False: the last row's sums (b, 1, d), not yet in `trace`


def run_over_spans(memory: SlotMemory, queries: torch.Tensor, values: torch.Tensor, slots: Slots,
                   trace: Trace, plan: SpanPlan, span: int, learn: bool, close_last: bool = True,
                   sums: Trace | None = None) -> SpanRun:
    """Read `memory` at every position and write it at span ends.

    queries: (b, T, d) unit vectors, used both to read and as write keys; values: (b, T, d).
    close_last=False leaves the last row to the caller: its sums come back as `pending`, and its
    span ends are not written. Nothing in this call reads after them, so a model can add all its
    memories' pending sums and write them in one batch (`ReverieLM._close_last_spans`).
    sums: each row's sums of queries and values (`span_sums`), when the caller made them; else
    they are summed here.

    Reads inside a row of the plan see only the slots as they were at the row's start, so the
    loop below runs just the write recurrence, collecting those snapshots, and all reads are one
    `memory.read` over (b * S) rows of the grid. Without learning the slots never change: one
    read over the whole sequence. Rows that all end every user's span, written with autograd (a
    training chunk), run on a pool of items instead (`model.pooled_writes.run_pooled`). Equal to
    `run_over_spans_reference` up to rounding.
    """
    writes = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    if not learn:
        return SpanRun(memory.read(queries, slots), slots, trace, writes, None)
    if plan.width == 1 and min(plan.lengths) == plan.length:  # a byte per row (decoding): its sums are itself
        query_grid, key_sums, value_sums = None, queries, values
    else:
        query_grid = plan.fold(queries)  # (b, S, P, d)
        key_sums, value_sums = sums if sums is not None else (query_grid.sum(2), plan.fold(values).sum(2))
    writes_rows = plan.rows > 1 or close_last  # else (decoding) the loop below writes nothing
    rule = memory.stacked_rule([memory]) if writes_rows else None  # once: its stacks are ops too
    looped = plan.rows if close_last else plan.rows - 1  # rows written here
    given = slots
    if _writes_pooled(plan, looped, slots):
        from model.pooled_writes import run_pooled  # that module imports this one

        query_grid = queries[:, :, None] if query_grid is None else query_grid
        chunk = (rule, slots, trace, query_grid.shape[1], key_sums[:, :looped], value_sums[:, :looped], span)
        run = _pooled_loop(*chunk) if _pooled_loop is not None else run_pooled(*chunk, row_step=_pooled_row)
        pending = None if close_last else Trace(key_sums[:, -1:], value_sums[:, -1:])
        reads = memory.read_pool(query_grid, run.pool_keys, run.pool_values, run.read_index, run.read_strengths)
        return SpanRun(plan.unfold(reads), run.slots, run.trace, writes + run.writes, pending)
    slots, trace, writes, stacked = _write_rows(rule, slots, trace, writes, key_sums, value_sums, plan, span,
                                                close_last)
    if close_last:
        pending = None
    else:  # the slices are skipped when there is one row: decoding runs this for every memory and byte
        pending = Trace(key_sums, value_sums) if plan.rows == 1 else Trace(key_sums[:, -1:], value_sums[:, -1:])
    if plan.rows == 1:
        reads = memory.read(queries, given)
    else:
        query_grid = queries[:, :, None] if query_grid is None else query_grid
        reads = plan.unfold(memory.read(query_grid.flatten(0, 1), Slots(*(t.flatten(0, 1) for t in stacked)))
                            .unflatten(0, query_grid.shape[:2]))
    return SpanRun(reads, slots, trace, writes, pending)


def _writes_pooled(plan: SpanPlan, looped: int, slots: Slots) -> bool:
    """Whether this call's writes run on a pool of items (model/pooled_writes.py): rows that all
    end a span for every user (a training chunk), where the torch write would run (autograd)."""
    if looped < 1 or not all(closes is True for closes in plan.closes[:looped]):
        return False
    from model.fused_write import fused_write_supported  # that module imports this one

    return not fused_write_supported(slots)


def _write_rows(rule: WriteRule | None, slots: Slots, trace: Trace, writes: torch.Tensor, key_sums: torch.Tensor,
                value_sums: torch.Tensor, plan: SpanPlan, span: int, close_last: bool
                ) -> tuple[Slots, Trace, torch.Tensor, Slots | None]:
    """`run_over_spans`'s write loop, row by row. Returns the slots, trace and writes after it, and
    the slots each row started from stacked on dim 1 (None for one row: its reads see the given slots)."""
    snapshots = []
    # Rows by unbind, not by indexing: the backward of one unbind is one stack, where each index's
    # would fill and add a gradient the size of all rows (rows x memories times a training step).
    key_rows, value_rows = (key_sums.unbind(1), value_sums.unbind(1)) if rule is not None else ((), ())
    for row, closes in enumerate(plan.closes):
        snapshots.append(slots)
        if row == plan.rows - 1 and not close_last:
            break
        trace = Trace(trace.keys + key_rows[row], trace.values + value_rows[row])
        slots, trace, writes = close_spans(rule, slots, trace, writes, closes, span)
    if len(snapshots) == 1:
        return slots, trace, writes, None
    return slots, trace, writes, Slots(*(torch.stack(parts, dim=1) for parts in zip(*snapshots)))


def close_spans(memory: SlotMemory | WriteRule, slots: Slots, trace: Trace, writes: torch.Tensor,
                closes: Closes, span: int) -> tuple[Slots, Trace, torch.Tensor]:
    """Write from the trace and empty it where a span closes; `closes` False leaves all as they are.

    `memory` may be a stacked `WriteRule` with slots and trace stacked along dim 1 (`write_slots`);
    the writes made are then summed over it into writes (b,).
    """
    if closes is False:
        return slots, trace, writes
    from model.fused_write import fused_write_supported, write_slots_in_place  # that module imports this one

    rule = memory if isinstance(memory, WriteRule) else memory.stacked_rule([memory])
    if fused_write_supported(slots):  # one kernel, on copies: the caller's tensors stay as they were
        one = slots.keys.dim() == 3  # one memory (b, m, d): give it the instance dim
        copy = (lambda t: t.clone()[:, None]) if one else torch.clone  # noqa: E731
        slots, trace = Slots(*map(copy, slots)), Trace(*map(copy, trace))
        writes = writes + write_slots_in_place(rule, slots, trace, span, None if closes is True else closes)
        if one:
            slots, trace = Slots(*(t[:, 0] for t in slots)), Trace(*(t[:, 0] for t in trace))
        return slots, trace, writes
    written, wrote = _autograd_write(rule, slots, trace, span, None if closes is True else closes)
    writes = writes + (wrote if wrote.dim() == 1 else wrote.sum(1))
    if closes is True:
        return written, Trace(torch.zeros_like(trace.keys), torch.zeros_like(trace.values)), writes
    keep = (~closes).to(trace.keys.dtype).view(-1, *(1,) * (trace.keys.dim() - 1))  # where no span ends
    return written, Trace(trace.keys * keep, trace.values * keep), writes


def run_over_spans_reference(memory: SlotMemory, queries: torch.Tensor, values: torch.Tensor, slots: Slots,
                             trace: Trace, plan: SpanPlan, span: int, learn: bool, close_last: bool = True,
                             sums: Trace | None = None) -> SpanRun:
    """The readable loop `run_over_spans` must equal: one user at a time, read a segment, then
    write if it closes a span. Same arguments and results as `run_over_spans` (it sums its own
    traces, so `sums` goes unread: a model run on it checks the sums it was given)."""
    results = []
    for user in range(queries.shape[0]):
        row = slice(user, user + 1)
        user_slots, user_trace = Slots(*(t[row] for t in slots)), Trace(*(t[row] for t in trace))
        pending = Trace(torch.zeros_like(user_trace.keys), torch.zeros_like(user_trace.values))
        reads, writes = [], torch.zeros(1, dtype=torch.long, device=queries.device)
        for index, segment in enumerate(plan.segments(user)):
            part = slice(segment.start, segment.stop)
            reads.append(memory.read(queries[row, part], user_slots))
            if not learn:
                continue
            sums = Trace(queries[row, part].sum(1), values[row, part].sum(1))
            if index == plan.rows - 1 and not close_last:  # segment i is in row i
                pending = sums
                continue
            user_trace = Trace(user_trace.keys + sums.keys, user_trace.values + sums.values)
            if segment.closes_span:
                user_slots, user_trace, writes = close_spans(memory, user_slots, user_trace, writes, True, span)
        user_reads = torch.cat(reads, dim=1)  # zeros past the user's length, where `run_over_spans` has any value
        results.append((F.pad(user_reads, (0, 0, 0, plan.length - user_reads.shape[1])), user_slots, user_trace,
                        writes, pending))
    reads, slots, traces, writes, pending = zip(*results)
    return SpanRun(torch.cat(reads), Slots(*map(torch.cat, zip(*slots))), Trace(*map(torch.cat, zip(*traces))),
                   torch.cat(writes), Trace(*(torch.cat(parts)[:, None] for parts in zip(*pending)))
                   if learn and not close_last else None)
