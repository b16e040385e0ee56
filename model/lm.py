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
from model.layers import AffineScan, RMSNorm, WorkingMemory, feed_forward, float32_or_wider, init_weights
from model.fused_write import fused_write_supported, write_slots_in_place
from model.memory import (Closes, EpisodicMemory, Fold, ProceduralMemory, SlotMemory, Slots, SpanPlan, SpanRun,
                          Trace, close_spans, run_over_spans, span_sums)


# FastState tensors with one row per layer (dim 1), and with one row per block.
LAYER_FIELDS = ("scan_h", "pm_k", "pm_v", "pm_s", "pm_elig_k", "pm_elig_v")
BLOCK_FIELDS = ("em_k", "em_v", "em_s", "em_elig_k", "em_elig_v")
PM_FIELDS = LAYER_FIELDS[1:]  # slots, then trace


@dataclass
class LayerState:
    carry: torch.Tensor  # (b, d)
    slots: Slots
    trace: Trace
    writes: torch.Tensor  # (b,)
    pending: Trace | None = None  # returned: the last row's sums, not yet in `trace` (`_close_last_spans`)


class Layer(nn.Module):
    """x += scan(x) + PM(x); x += FF(x). PM reads the layer input and stores what the scan produced."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.mix_norm = RMSNorm(config.d_model)
        self.mixer = AffineScan(config)
        self.procedural = ProceduralMemory(config.pm_decay, config.pm_budget)
        self.ff_norm = RMSNorm(config.d_model)
        self.ff = feed_forward(config)
        self.span = config.span

    def forward(self, x: torch.Tensor, state: LayerState, plan: SpanPlan, learn: bool,
                last: torch.Tensor | None = None, skip_memory: bool = False) -> tuple[torch.Tensor, LayerState]:
        """The plan's last row (its trace sums and span ends) is left to `ReverieLM._close_last_spans`.
        last: (b,) each user's last position in a right-padded batch (None: all T - 1).
        skip_memory: PM is neither read nor written (learn off over empty memory: its reads are zero)."""
        x, carry, queries, values, sums = self.mix(x, state.carry, last, not skip_memory, _row_fold(plan, learn))
        if skip_memory:
            return self.feed(x, None), LayerState(carry, state.slots, state.trace, state.writes)
        with torch.autocast(device_type=x.device.type, enabled=False):  # memory math in float32
            run = run_over_spans(self.procedural, queries, values, state.slots, state.trace, plan, self.span, learn,
                                 close_last=False, sums=sums)
        return self.feed(x, run.reads), LayerState(carry, run.slots, run.trace, state.writes + run.writes, run.pending)

    def mix(self, x: torch.Tensor, carry: torch.Tensor, last: torch.Tensor | None, memory: bool = True,
            fold: Fold | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, Trace | None]:
        """x + scan(norm(x)), the new carry, PM's queries and values (float32 or wider; None without
        memory) and, given a fold, their sums over each row of spans (`span_sums`): all the layer
        does before its memory, one piece for `ReverieLM.compile_layers` to fuse."""
        u = self.mix_norm(x)
        y, carry = self.mixer(u, carry, last)
        if not memory:
            return x + y, carry, None, None, None
        with torch.autocast(device_type=x.device.type, enabled=False):  # memory math in float32
            wide = float32_or_wider(u)
            queries, values = F.normalize(u.to(wide), dim=-1), y.to(wide)
        return x + y, carry, queries, values, span_sums(queries, values, fold)

    def feed(self, x: torch.Tensor, reads: torch.Tensor | None) -> torch.Tensor:
        """x + PM's reads, then the feed-forward's residual: all the layer does after its memory."""
        if reads is not None:
            x = x + reads.to(x.dtype)
        return x + self.ff(self.ff_norm(x))


class Block(nn.Module):
    """L layers, then the block's episodic memory."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.layers_per_block))
        self.em_norm = RMSNorm(config.d_model)
        self.episodic = EpisodicMemory(config.d_model, config.em_topk, config.em_decay, config.em_budget)
        self.span = config.span

    def recall(self, x: torch.Tensor, slots: Slots, trace: Trace, plan: SpanPlan, learn: bool
               ) -> tuple[torch.Tensor, SpanRun]:
        """Episodic read/write at the block's output: x (b, T, d) -> x + EM(x) and what the memory did.
        As in `Layer.forward`, the last row is left to the model."""
        queries, values, sums = self.memory_inputs(x, _row_fold(plan, learn))
        with torch.autocast(device_type=x.device.type, enabled=False):
            run = run_over_spans(self.episodic, queries, values, slots, trace, plan, self.span, learn,
                                 close_last=False, sums=sums)
        return x + run.reads.to(x.dtype), run

    def memory_inputs(self, x: torch.Tensor, fold: Fold | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, Trace | None]:
        """EM's queries and values (the normed block output), float32 or wider, and given a fold
        their sums over each row of spans: one piece for `ReverieLM.compile_layers` to fuse."""
        u = self.em_norm(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            values = u.to(float32_or_wider(u))
            queries = self.episodic.queries(values)
        return queries, values, span_sums(queries, values, fold)


class ReverieLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_blocks))
        self.wm_norm = RMSNorm(config.d_model)
        self.working_memory = WorkingMemory(config)
        self.final_norm = RMSNorm(config.d_model)
        init_weights(self, config.n_layers)
        self.last_metrics: dict[str, float] = {}
        self._active_param_counts: dict[int, int] = {}  # shapes never change, so counts are cached
        self._layers_compiled = False

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

    def compile_layers(self, backend: str = "inductor") -> None:
        """torch.compile the pieces of every layer, in place: what a layer does before its memory
        (`Layer.mix`: norm, mixer, residual, PM's queries) and after it (`Layer.feed`), memory
        reads (a training chunk's too: `read_pool`, with the memory's output), EM's queries and
        values (`Block.memory_inputs`) and the working memory. The span loop stays Python (its writes
        have `model.memory.compiled_writes` and, on CUDA, `model.fused_loop`); layers of one shape
        share the compiled code. What it fuses is memory traffic: session 12's profile (H200) had
        ~25% of a step in eager elementwise glue between the compiled modules, so the glue is now
        inside the pieces (bench/NOTES.md). Calling it again changes nothing."""
        if self._layers_compiled:
            return
        self._layers_compiled = True
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for block in self.blocks:
            for layer in block.layers:
                layer.mix = torch.compile(layer.mix, backend=backend)
                layer.feed = torch.compile(layer.feed, backend=backend)
                layer.procedural.read = torch.compile(layer.procedural.read, backend=backend)
                layer.procedural.read_pool = torch.compile(layer.procedural.read_pool, backend=backend)
            block.memory_inputs = torch.compile(block.memory_inputs, backend=backend)
            block.episodic.read = torch.compile(block.episodic.read, backend=backend)
            block.episodic.read_pool = torch.compile(block.episodic.read_pool, backend=backend)
        self.working_memory.compile(backend=backend)

    def memories(self) -> dict[type, list[SlotMemory]]:
        """The procedural memories (one a layer) and the episodic ones (one a block), each in order."""
        return {ProceduralMemory: [layer.procedural for block in self.blocks for layer in block.layers],
                EpisodicMemory: [block.episodic for block in self.blocks]}

    def autocast_matrices(self) -> dict[str, nn.Parameter]:
        """The weights autocast casts at every call: the linear layers of the mixers, feed-forwards
        and working memory, by name. (The memories' own layers run with autocast off, in float32;
        the tied head is small.) A CUDA-graphed decode step holds them in bf16 instead
        (model/decode_graph.py): inside a graph or a compiled step the casts run at every step."""
        modules = [part for block in self.blocks for layer in block.layers for part in (layer.mixer, layer.ff)]
        wanted = {id(linear.weight) for module in (*modules, self.working_memory) for linear in module.modules()
                  if isinstance(linear, nn.Linear)}
        return {name: p for name, p in self.named_parameters() if id(p) in wanted}

    def hold_matrices(self, dtype: torch.dtype) -> None:
        """Store `autocast_matrices()` in `dtype`, in place, for a model that runs only under an
        autocast of that dtype and never learns (the sleep's teacher): autocast casts each matrix
        at every call, the same values each time (base: 66 cast kernels in every sleep step)."""
        wanted = {id(p) for p in self.autocast_matrices().values()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module.weight) in wanted:
                module.to(dtype)

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
                active_layers: int | None = None, lengths: list[int] | None = None, donate_state: bool = False,
                positions: list[int] | None = None) -> tuple[torch.Tensor, FastState]:
        """tokens: (b, T) bytes; state: FastState for b users (None = empty).

        learn=False reads fast memory but writes none; from no state there is nothing to read, so
        the memories are skipped (the sleep's student). active_layers < n_layers exits early
        through the shared head; skipped layers and memories keep their state. lengths: each
        user's bytes when users of different lengths come right-padded to T (None: T each); each
        user's state then moves by its own bytes only, and its logits past them are padding.
        donate_state=True: the caller will not use `state` again, so a memory write may change its
        tensors in place rather than copy them (the fused write touches only the slots it writes).
        positions: `state.pos` as a list, when the caller keeps track of it (a decoding loop): reading
        it from the device is otherwise the host sync of every call.
        Returns logits (b, T, 256) and the new FastState.
        """
        self._check_tokens(tokens)
        tokens = tokens.long()
        batch, length = tokens.shape
        span = self.config.span
        empty_memory = state is None and not learn
        if state is None:  # the empty state's positions are known without asking the device
            state = FastState.empty(self.config, batch, device=tokens.device)
            positions = [0] * batch
        elif state.batch_size != batch:
            raise ValueError(f"FastState holds {state.batch_size} users but tokens have batch {batch}")
        elif positions is None:
            positions = state.pos.tolist()  # the one host sync of a forward with a given state
        elif len(positions) != batch:
            raise ValueError(f"positions must give each of the {batch} users one position, got {len(positions)}")
        # Without learning nothing is written, so where each user's spans end does not matter.
        phases = [p % span for p in positions] if learn else [0] * batch
        started = time.perf_counter()
        active = self.config.n_layers if active_layers is None else active_layers
        if not 1 <= active <= self.config.n_layers:
            raise ValueError(f"active_layers must be in 1..{self.config.n_layers}, got {active}")
        if lengths is not None and (len(lengths) != batch or any(not 1 <= n <= length for n in lengths)):
            raise ValueError(f"lengths must give each of the {batch} users 1..{length} bytes, got {lengths}")
        if lengths is not None and min(lengths) == length:
            lengths = None
        if length == 1 and learn and 0 < sum(phase == span - 1 for phase in phases) < batch:
            # Decoding users whose spans end at different bytes: the mask of those closing now, made
            # on the device from the state (a mask from the host list would be a copy that waits).
            plan = SpanPlan.one_byte(state.pos % span == span - 1, batch)
        else:
            plan = SpanPlan.of(phases, length, span, tokens.device, lengths)
        own = None if lengths is None else torch.tensor(lengths, device=tokens.device)
        logits, new_state = self._run(tokens, state, learn, active, plan, fresh=not any(positions), lengths=own,
                                      donate_state=donate_state, empty_memory=empty_memory)
        self.last_metrics = {"active_params": self.active_params(active), "active_layers": active,
                             "latency_ms": (time.perf_counter() - started) * 1000.0,
                             "complexity": float("nan")}  # set by model.adaptive.AdaptiveDepth when it chose the depth
        return logits, new_state

    def _run(self, tokens: torch.Tensor, state: FastState, learn: bool, active: int, plan: SpanPlan, fresh: bool,
             lengths: torch.Tensor | None = None, donate_state: bool = False, empty_memory: bool = False
             ) -> tuple[torch.Tensor, FastState]:
        """The network over tokens (b, T) from `state`, with no host syncs (CUDA-graph capturable
        for fixed arguments). fresh: every user is at position 0 with empty working memory.
        lengths: (b,) each user's bytes of a right-padded batch (None: T each). empty_memory: the
        PMs and EMs hold nothing and learn is off, so every read would be zero: none is made."""
        last = None if lengths is None else lengths - 1
        writes = state.writes
        x = residual_stream(self.embed(tokens))
        rows: dict[str, list[torch.Tensor | None]] = {name: [] for name in LAYER_FIELDS + BLOCK_FIELDS}
        pending: dict[type, list[Trace]] = {ProceduralMemory: [], EpisodicMemory: []}
        wm = (state.wm_k, state.wm_v, state.wm_pos)
        index = 0
        for b, block in enumerate(self.blocks):
            for layer in block.layers:
                if index == active:
                    break
                given = LayerState(state.scan_h[:, index],
                                   Slots(state.pm_k[:, index], state.pm_v[:, index], state.pm_s[:, index]),
                                   Trace(state.pm_elig_k[:, index], state.pm_elig_v[:, index]), writes)
                x, returned = layer(x, given, plan, learn, last, skip_memory=empty_memory)
                writes = returned.writes
                _collect(rows, LAYER_FIELDS, (given.carry, *given.slots, *given.trace),
                         (returned.carry, *returned.slots, *returned.trace))
                if returned.pending is not None:
                    pending[ProceduralMemory].append(returned.pending)
                index += 1
            else:
                slots = Slots(state.em_k[:, b], state.em_v[:, b], state.em_s[:, b])
                trace = Trace(state.em_elig_k[:, b], state.em_elig_v[:, b])
                if not empty_memory:
                    x, run = block.recall(x, slots, trace, plan, learn)
                    writes = writes + run.writes
                    _collect(rows, BLOCK_FIELDS, (*slots, *trace), (*run.slots, *run.trace))
                    if run.pending is not None:
                        pending[EpisodicMemory].append(run.pending)
                if b == 0:
                    out, *wm = self.working_memory(self.wm_norm(x), *wm, state.pos, fresh, lengths,
                                                   in_place=donate_state)
                    x = x + out
                continue
            break
        logits = F.linear(self.final_norm(x), self.embed.weight)
        new = state.tensors()
        for name, replaced in rows.items():
            new[name] = _replace_rows(new[name], replaced)
        if learn:
            writes = self._close_last_spans(new, pending, plan.closes[-1], writes, None if donate_state else state)
        new["wm_k"], new["wm_v"], new["wm_pos"] = wm
        new["pos"] = state.pos + (tokens.shape[1] if lengths is None else lengths)
        new["writes"] = writes
        return logits, FastState(**new)

    def _close_last_spans(self, new: dict[str, torch.Tensor], pending: dict[type, list[Trace]], closes: Closes,
                          writes: torch.Tensor, kept: FastState | None) -> torch.Tensor:
        """The call's last row for every memory it ran: its sums join the traces, and the spans that
        end with it are written, all procedural memories as one batched write and all episodic ones
        as another. Nothing in the call read after them, so this equals doing it in each layer, in 2
        writes instead of n_layers + n_blocks; decoding users at different span offsets write on
        most bytes.

        new: the state's tensors (b, n, ...), updated here. pending: each memory's last-row sums
        (b, 1, d), by kind, in layer order. Without autograd the write runs as one fused kernel
        (model/fused_write.py) that changes only the slots it writes, in place; `kept`, the caller's
        state unless donated, is copied first where `new` still shares its tensors; the kernel adds
        the sums to the traces too, so a compiled step neither adds them apart nor copies them back.
        Returns writes (b,) plus those made.
        """
        by_kind = self.memories()
        groups = ((ProceduralMemory, by_kind[ProceduralMemory], PM_FIELDS),
                  (EpisodicMemory, by_kind[EpisodicMemory], BLOCK_FIELDS))
        with torch.autocast(device_type=writes.device.type, enabled=False):  # memory math in float32
            for kind, memories, fields in groups:
                sums, count = pending[kind], len(pending[kind])
                if not count:
                    continue
                slot_names, trace_names = fields[:3], fields[3:]
                added = Trace(*(torch.cat(parts, dim=1) for parts in zip(*sums)))
                rule = kind.stacked_rule(memories[:count]) if closes is not False else None
                if rule is not None and fused_write_supported(Slots(*(new[name] for name in slot_names))):
                    for name in fields:  # the kernel writes in place: never into the caller's kept state
                        if kept is not None and new[name] is getattr(kept, name):
                            new[name] = new[name].clone()
                    writes = writes + write_slots_in_place(
                        rule, Slots(*(_first_rows(new[name], count) for name in slot_names)),
                        Trace(*(_first_rows(new[name], count) for name in trace_names)), self.config.span,
                        None if closes is True else closes, added)
                    continue
                for name, sums_of_rows in zip(trace_names, added):
                    new[name] = _add_to_first_rows(new[name], sums_of_rows)
                if rule is None:
                    continue
                slots, trace, writes = close_spans(rule, Slots(*(_first_rows(new[name], count) for name in slot_names)),
                                                   Trace(*(_first_rows(new[name], count) for name in trace_names)), writes,
                                                   closes, self.config.span)
                for name, written in zip(fields, (*slots, *trace), strict=True):
                    new[name] = _replace_first_rows(new[name], written)
        return writes

    @torch.no_grad()
    def step(self, byte: torch.Tensor, state: FastState, *, learn: bool = True, donate_state: bool = False,
             positions: list[int] | None = None) -> tuple[torch.Tensor, FastState]:
        """One byte per user: byte (b,) -> logits (b, 256), next state (donate_state, positions: as in
        `forward`; bytes as uint8 skip the range check, which reads them back from the device)."""
        logits, state = self.forward(byte[:, None], state, learn=learn, donate_state=donate_state, positions=positions)
        return logits[:, 0], state


def residual_stream(embedded: torch.Tensor) -> torch.Tensor:
    """The residual stream in autocast's dtype when autocast is on (bf16 on a GPU), as Megatron-LM
    keeps it by default. The float32 embedding would otherwise make every layer's residual adds,
    norm inputs and their gradients float32: twice the bytes of the stream, and autograd's sums of
    its gradients float32 too (H200, `base` training step: ~13 ms of the 85 ms ran kernels reading
    or writing the float32 stream; with the stream bf16, and the window attention's chunks, its
    kernels took 81.3 ms). Each add's output is rounded to bf16; the memories still read and write
    in float32 (`float32_or_wider`)."""
    device = embedded.device.type
    return embedded.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else embedded


def _row_fold(plan: SpanPlan, learn: bool) -> Fold | None:
    """The fold for `span_sums` when the memories will write from row sums (learning over more
    than a byte a user) and every user folds alike; else None."""
    return plan.uniform_fold() if learn and plan.width > 1 else None


def bits_per_byte(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in bits. logits (b, T, 256), targets (b, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) / torch.log(torch.tensor(2.0))


def _collect(rows: dict[str, list[torch.Tensor | None]], names: tuple[str, ...],
             given: tuple[torch.Tensor, ...], returned: tuple[torch.Tensor, ...]) -> None:
    """Append each returned per-layer (or per-block) tensor under its FastState name, None where the
    forward returned the given tensor itself (nothing wrote it)."""
    for name, old, new in zip(names, given, returned, strict=True):
        rows[name].append(None if new is old else new)


def _first_rows(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """tensor[:, :count], without the slicing op when that is all of it (decoding runs this often)."""
    return tensor if tensor.shape[1] == count else tensor[:, :count]


def _add_to_first_rows(old: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
    """old (b, n, ...) with added (b, k, ...) added to its first k rows, as a new tensor."""
    if added.shape[1] == old.shape[1]:
        return old + added
    return torch.cat([old[:, :added.shape[1]] + added, old[:, added.shape[1]:]], dim=1)


def _replace_first_rows(old: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """old (b, n, ...) with its first k rows replaced by first (b, k, ...)."""
    if first.shape[1] == old.shape[1]:
        return first
    return torch.cat([first, old[:, first.shape[1]:]], dim=1)


def _replace_rows(old: torch.Tensor, rows: list[torch.Tensor | None]) -> torch.Tensor:
    """old (b, n, ...) with old[:, i] replaced by rows[i] (i < len(rows), None = keep). Returns
    old itself when nothing is replaced: states are never changed in place, so sharing is safe."""
    if all(row is None for row in rows):
        return old
    rows = rows + [None] * (old.shape[1] - len(rows))
    return torch.stack([old[:, i] if row is None else row for i, row in enumerate(rows)], dim=1)
