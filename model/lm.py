"""ReverieLM: the byte-level Brain-Core v2 network, with its fast state passed in and returned.

Structure: embedding -> B blocks, each of L layers (recurrence + procedural memory, then
feed-forward) closed by the block's episodic memory; the one shared working-memory attention
follows block 0; a final norm and the tied byte head. Every forward takes a FastState and
returns the next one: `model(tokens, state)` on a whole sequence and `model.step(byte, state)`
one byte at a time give the same logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.fast_state import FastState
from model.layers import AffineScan, WorkingMemory, feed_forward, float32_or_wider, init_weights
from model.memory import (EpisodicMemory, ProceduralMemory, Segment, Slots, Trace, run_over_spans,
                          span_segments)


# FastState tensors with one row per layer (dim 1), and with one row per block.
LAYER_FIELDS = ("scan_h", "pm_k", "pm_v", "pm_s", "pm_elig_k", "pm_elig_v")
BLOCK_FIELDS = ("em_k", "em_v", "em_s", "em_elig_k", "em_elig_v")


@dataclass
class LayerState:
    carry: torch.Tensor  # (b, d)
    slots: Slots
    trace: Trace
    writes: torch.Tensor  # (b,)


class Layer(nn.Module):
    """x += scan(x) + PM(x); x += FF(x). PM reads the layer input and stores what the scan produced."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.mix_norm = nn.RMSNorm(config.d_model)
        self.mixer = AffineScan(config)
        self.procedural = ProceduralMemory(config.pm_decay, config.pm_budget)
        self.ff_norm = nn.RMSNorm(config.d_model)
        self.ff = feed_forward(config)
        self.span = config.span

    def forward(self, x: torch.Tensor, state: LayerState, segments, learn: bool
                ) -> tuple[torch.Tensor, LayerState]:
        u = self.mix_norm(x)
        y, carry = self.mixer(u, state.carry)
        with torch.autocast(device_type=x.device.type, enabled=False):  # memory math in float32
            wide = float32_or_wider(u)
            queries = F.normalize(u.to(wide), dim=-1)
            reads, slots, trace, writes = run_over_spans(self.procedural, queries, y.to(wide), state.slots,
                                                         state.trace, segments, self.span, learn)
        x = x + y + reads.to(x.dtype)
        x = x + self.ff(self.ff_norm(x))
        return x, LayerState(carry, slots, trace, state.writes + writes)


class Block(nn.Module):
    """L layers, then the block's episodic memory."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.layers_per_block))
        self.em_norm = nn.RMSNorm(config.d_model)
        self.episodic = EpisodicMemory(config.d_model, config.em_topk, config.em_decay, config.em_budget)
        self.span = config.span

    def recall(self, x: torch.Tensor, slots: Slots, trace: Trace, segments, learn: bool):
        """Episodic read/write at the block's output: x (b, T, d) -> x + EM(x), new slots, trace, writes."""
        u = self.em_norm(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            wide = float32_or_wider(u)
            queries = self.episodic.queries(u.to(wide))
            reads, slots, trace, writes = run_over_spans(self.episodic, queries, u.to(wide), slots, trace,
                                                         segments, self.span, learn)
        return x + reads.to(x.dtype), slots, trace, writes


class ReverieLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_blocks))
        self.wm_norm = nn.RMSNorm(config.d_model)
        self.working_memory = WorkingMemory(config)
        self.final_norm = nn.RMSNorm(config.d_model)
        init_weights(self, config.n_layers)
        self.last_metrics: dict[str, float] = {}
        self._active_param_counts: dict[int, int] = {}  # shapes never change, so counts are cached

    # --- sizes ---------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_params(self, active_layers: int) -> int:
        """Parameters used by a forward that runs the first `active_layers` layers (early exit)."""
        if active_layers not in self._active_param_counts:
            self._active_param_counts[active_layers] = self._count_active_params(active_layers)
        return self._active_param_counts[active_layers]

    def _count_active_params(self, active_layers: int) -> int:
        count = self.embed.weight.numel() + sum(p.numel() for p in self.final_norm.parameters())
        remaining = active_layers
        for index, block in enumerate(self.blocks):
            ran = block.layers[:remaining]
            count += sum(p.numel() for layer in ran for p in layer.parameters())
            remaining -= len(ran)
            if len(ran) == len(block.layers):
                count += sum(p.numel() for n, p in block.named_parameters() if not n.startswith("layers."))
                if index == 0:
                    count += sum(p.numel() for m in (self.wm_norm, self.working_memory) for p in m.parameters())
        return count

    # --- forward -------------------------------------------------------------------------------
    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of byte values, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
            raise TypeError(f"tokens must be an integer tensor of byte values, got dtype {tokens.dtype}")
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must have shape (batch, length) with length >= 1, got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"{tokens.shape[1]} bytes exceed max_seq_len={self.config.max_seq_len}; "
                             f"feed longer input in chunks, carrying the FastState between them")
        if tokens.numel() and tokens.dtype != torch.uint8:  # one host sync for both bounds
            low, high = torch.stack(torch.aminmax(tokens)).tolist()
            if low < 0 or high > 255:
                raise ValueError(f"tokens must be byte values 0..255, got range [{low}, {high}]")

    def forward(self, tokens: torch.Tensor, state: FastState | None = None, *, learn: bool = True,
                active_layers: int | None = None) -> tuple[torch.Tensor, FastState]:
        """tokens: (b, T) bytes; state: FastState for b users (None = empty).

        learn=False reads fast memory but writes none. active_layers < n_layers exits early
        through the shared head; skipped layers and memories keep their state.
        Returns logits (b, T, 256) and the new FastState.
        """
        self._check_tokens(tokens)
        tokens = tokens.long()
        batch, length = tokens.shape
        span = self.config.span
        if state is None:  # the empty state's positions are known without asking the device
            state = FastState.empty(self.config, batch, device=tokens.device)
            positions = [0] * batch
        elif state.batch_size != batch:
            raise ValueError(f"FastState holds {state.batch_size} users but tokens have batch {batch}")
        else:
            positions = state.pos.tolist()  # the one host sync of a forward with a given state
        # Without learning nothing is written, so where each user's spans end does not matter.
        phases = [p % span for p in positions] if learn else [0] * batch
        aligned = len(set(phases)) == 1
        if not aligned and length > 1:
            # Users at different offsets inside a span: run each alone so spans stay aligned.
            results = [self.forward(tokens[i:i + 1], state.rows(slice(i, i + 1)), learn=learn,
                                    active_layers=active_layers) for i in range(batch)]
            return torch.cat([r[0] for r in results]), FastState.cat([r[1] for r in results])
        started = time.perf_counter()
        active = self.config.n_layers if active_layers is None else active_layers
        if not 1 <= active <= self.config.n_layers:
            raise ValueError(f"active_layers must be in 1..{self.config.n_layers}, got {active}")
        if aligned:
            segments = span_segments(phases[0], length, span)
        else:  # one byte per user: each user's span may or may not end here
            segments = [Segment(0, 1, closes_span=decode_closes(phases, state.pos, span))]
        logits, new_state = self._run(tokens, state, learn, active, segments, fresh=not any(positions))
        self.last_metrics = {"active_params": self.active_params(active), "active_layers": active,
                             "latency_ms": (time.perf_counter() - started) * 1000.0,
                             "complexity": float("nan")}  # set by model.adaptive.AdaptiveDepth when it chose the depth
        return logits, new_state

    def _run(self, tokens: torch.Tensor, state: FastState, learn: bool, active: int,
             segments: list[Segment], fresh: bool) -> tuple[torch.Tensor, FastState]:
        """The network over tokens (b, T) from `state`, with no host syncs (CUDA-graph capturable
        for fixed arguments). fresh: every user is at position 0 with empty working memory."""
        writes = state.writes
        x = self.embed(tokens)
        rows: dict[str, list[torch.Tensor | None]] = {name: [] for name in LAYER_FIELDS + BLOCK_FIELDS}
        wm = (state.wm_k, state.wm_v, state.wm_pos)
        index = 0
        for b, block in enumerate(self.blocks):
            for layer in block.layers:
                if index == active:
                    break
                given = LayerState(state.scan_h[:, index],
                                   Slots(state.pm_k[:, index], state.pm_v[:, index], state.pm_s[:, index]),
                                   Trace(state.pm_elig_k[:, index], state.pm_elig_v[:, index]), writes)
                x, returned = layer(x, given, segments, learn)
                writes = returned.writes
                _collect(rows, LAYER_FIELDS, (given.carry, *given.slots, *given.trace),
                         (returned.carry, *returned.slots, *returned.trace))
                index += 1
            else:
                slots = Slots(state.em_k[:, b], state.em_v[:, b], state.em_s[:, b])
                trace = Trace(state.em_elig_k[:, b], state.em_elig_v[:, b])
                x, new_slots, new_trace, em_writes = block.recall(x, slots, trace, segments, learn)
                writes = writes + em_writes
                _collect(rows, BLOCK_FIELDS, (*slots, *trace), (*new_slots, *new_trace))
                if b == 0:
                    out, *wm = self.working_memory(self.wm_norm(x), *wm, state.pos, fresh)
                    x = x + out
                continue
            break
        logits = F.linear(self.final_norm(x), self.embed.weight)
        new = state.tensors()
        for name, replaced in rows.items():
            new[name] = _replace_rows(new[name], replaced)
        new["wm_k"], new["wm_v"], new["wm_pos"] = wm
        new["pos"], new["writes"] = state.pos + tokens.shape[1], writes
        return logits, FastState(**new)

    @torch.no_grad()
    def step(self, byte: torch.Tensor, state: FastState, *, learn: bool = True
             ) -> tuple[torch.Tensor, FastState]:
        """One byte per user: byte (b,) -> logits (b, 256), next state."""
        logits, state = self.forward(byte[:, None], state, learn=learn)
        return logits[:, 0], state


def bits_per_byte(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in bits. logits (b, T, 256), targets (b, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) / torch.log(torch.tensor(2.0))


def decode_closes(phases: list[int], pos: torch.Tensor, span: int) -> bool | torch.Tensor:
    """Whose span ends with this one byte, for users at different phases: False when nobody's
    (known on the host: no write is computed), else a (b,) bool mask computed on the device."""
    if all(phase + 1 != span for phase in phases):
        return False
    return (pos % span) + 1 == span


def _collect(rows: dict[str, list[torch.Tensor | None]], names: tuple[str, ...],
             given: tuple[torch.Tensor, ...], returned: tuple[torch.Tensor, ...]) -> None:
    """Append each returned per-layer (or per-block) tensor under its FastState name, None where the
    forward returned the given tensor itself (nothing wrote it)."""
    for name, old, new in zip(names, given, returned, strict=True):
        rows[name].append(None if new is old else new)


def _replace_rows(old: torch.Tensor, rows: list[torch.Tensor | None]) -> torch.Tensor:
    """old (b, n, ...) with old[:, i] replaced by rows[i] (i < len(rows), None = keep). Returns
    old itself when nothing is replaced: states are never changed in place, so sharing is safe."""
    if all(row is None for row in rows):
        return old
    rows = rows + [None] * (old.shape[1] - len(rows))
    return torch.stack([old[:, i] if row is None else row for i, row in enumerate(rows)], dim=1)
