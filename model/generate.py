"""Sampling bytes with online fast-memory writes, one user or a batch of users at once."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from model.decode_graph import DecodeGraphs
from model.fast_state import FastState
from model.lm import ReverieLM


@dataclass(frozen=True)
class GenerationConfig:
    max_new_bytes: int = 64
    temperature: float = 0.8  # 0 = greedy
    learn: bool = True  # write fast memory while reading the prompt and the reply
    stop_byte: int | None = None  # end a reply early at this byte (e.g. ord("\n"))
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.max_new_bytes <= 4096:
            raise ValueError(f"max_new_bytes must be in 0..4096, got {self.max_new_bytes}")
        if not 0.0 <= self.temperature <= 10.0 or math.isnan(self.temperature):
            raise ValueError(f"temperature must be in [0, 10], got {self.temperature}")


@dataclass
class Generation:
    response: bytes
    metrics: dict[str, float] = field(default_factory=dict)


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits (b, 256) -> bytes (b,) as uint8: bytes by construction, so the model need not check them."""
    if temperature == 0.0:
        return logits.argmax(dim=-1).to(torch.uint8)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(torch.uint8)


def _prefill(model: ReverieLM, prompts: list[bytes], state: FastState, learn: bool, positions: list[int]
             ) -> tuple[torch.Tensor, FastState, list[float]]:
    """Read the prompts together, right-padded to the longest, in chunks of max_seq_len; every
    prompt must have bytes in every chunk (`_prefill_groups`). Users may be at any span phase.

    positions: `state.pos` as a list. -> last logits (b, 256), state, each prompt's surprise in bits/byte.
    """
    device = state.pos.device
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    tokens = torch.tensor([list(p) + [0] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
    users = torch.arange(len(prompts), device=device)
    nll = torch.zeros(len(prompts), dtype=torch.float64, device=device)
    counted = torch.zeros(len(prompts), dtype=torch.float64, device=device)
    logits = None
    for start in range(0, width, model.config.max_seq_len):
        chunk = tokens[:, start:start + model.config.max_seq_len]
        if logits is not None:  # the previous chunk's last position predicts this chunk's first byte
            nll -= torch.log_softmax(logits.float(), -1).gather(-1, chunk[:, :1])[:, 0].double()
            counted += 1
        chunk_lengths = [min(n - start, chunk.shape[1]) for n in lengths]
        out, state = model(chunk, state, learn=learn, lengths=chunk_lengths, positions=positions)
        positions = [p + n for p, n in zip(positions, chunk_lengths)]
        own = torch.tensor(chunk_lengths, device=device)
        predicted = torch.arange(chunk.shape[1] - 1, device=device) < (own - 1)[:, None]  # targets that are bytes
        log_probs = torch.log_softmax(out[:, :-1].float(), dim=-1).gather(-1, chunk[:, 1:, None])[..., 0]
        nll -= (log_probs.double() * predicted).sum(1)  # in float64: padding must not change the rounding
        counted += own - 1
        logits = out[users, own - 1]
    surprise = torch.where(counted > 0, nll / counted.clamp(min=1) / math.log(2), 0.0).tolist()
    return logits, state, surprise


def _prefill_groups(prompts: list[bytes], max_seq_len: int) -> list[list[int]]:
    """Users whose prompts can be read in one batch: all that fit one chunk of max_seq_len bytes
    (right-padded to the longest), and longer ones of equal length."""
    groups: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(0 if len(prompt) <= max_seq_len else len(prompt), []).append(i)
    return list(groups.values())


def _unshared(state: FastState, given: FastState) -> FastState:
    """`state` with copies of the tensors it shares with `given` (those a forward left unchanged)."""
    given_tensors = given.tensors()
    return FastState(**{name: tensor.clone() if tensor is given_tensors[name] else tensor
                        for name, tensor in state.tensors().items()})


@torch.no_grad()
def generate_batch(model: ReverieLM, prompts: list[bytes], state: FastState, config: GenerationConfig,
                   graphs: DecodeGraphs | None = None) -> tuple[list[Generation], FastState]:
    """One reply per user. Prompts are read in batches of users they can share (`_prefill_groups`);
    replies are decoded for all users together. The decoding loop keeps the users' positions on the
    host and reads the sampled bytes back once at the end (each step, with a `stop_byte`), so its
    steps queue on a GPU without waiting for each other. graphs: decode through `model`'s captured
    steps (model/decode_graph.py) where they take this batch."""
    if len(prompts) != state.batch_size:
        raise ValueError(f"{len(prompts)} prompts for a FastState of {state.batch_size} users")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one byte")
    started = time.perf_counter()
    generator = torch.Generator(device=state.pos.device).manual_seed(config.seed) if config.seed is not None else None
    writes_before = state.writes.clone()
    positions = state.pos.tolist()
    groups = _prefill_groups(prompts, model.config.max_seq_len)
    if len(groups) == 1:  # the common case: everyone in one batch, in order
        logits, read, surprises = _prefill(model, prompts, state, config.learn, positions)
        state = _unshared(read, state)
    else:
        rows: list[FastState | None] = [None] * len(prompts)
        last_logits: list[torch.Tensor | None] = [None] * len(prompts)
        surprises = [0.0] * len(prompts)
        for group in groups:
            logits, read, surprise = _prefill(model, [prompts[i] for i in group], state.rows(group), config.learn,
                                              [positions[i] for i in group])
            for j, i in enumerate(group):
                rows[i], last_logits[i], surprises[i] = read.rows(slice(j, j + 1)), logits[j], surprise[j]
        state = FastState.cat(rows)
        logits = torch.stack(last_logits)
    # `state` is now a batch no caller holds: decoding donates it, so writes may change it in place.
    positions = [p + len(prompt) for p, prompt in zip(positions, prompts)]
    graphed = graphs.step_for(state, config.learn) if graphs is not None and config.max_new_bytes else None
    sampled: list[torch.Tensor] = []
    replies = [bytearray() for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(config.max_new_bytes):
        byte = _sample(logits, config.temperature, generator)
        if config.stop_byte is not None:  # which replies end needs the bytes now
            for i, value in enumerate(byte.tolist()):
                if not done[i]:
                    replies[i].append(value)
                    done[i] = value == config.stop_byte
            if all(done):
                break
        else:
            sampled.append(byte)
        if graphed is not None:
            logits = graphed(byte)
        else:
            logits, state = model.step(byte, state, learn=config.learn, donate_state=True, positions=positions)
            positions = [p + 1 for p in positions]
    if graphed is not None:
        state = graphed.state(len(prompts))
    if sampled:
        for reply, values in zip(replies, torch.stack(sampled, dim=1).tolist()):
            reply.extend(values)
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    writes = (state.writes - writes_before).tolist()
    active_params = model.last_metrics.get("active_params")
    results = [Generation(bytes(reply), {"active_params": model.num_params() if active_params is None else active_params,
                                         "latency_ms": elapsed_ms,
                                         "complexity": model.last_metrics.get("complexity", float("nan")),
                                         "memory_writes": int(writes[i]), "surprise_bits": surprises[i]})
               for i, reply in enumerate(replies)]
    return results, state


def generate(model: ReverieLM, prompt: bytes, state: FastState | None = None,
             config: GenerationConfig = GenerationConfig()) -> tuple[Generation, FastState]:
    """One user's reply; `state` carries what the model learned about this user so far."""
    device = next(model.parameters()).device
    state = FastState.empty(model.config, 1, device=device) if state is None else state
    results, state = generate_batch(model, [prompt], state, config)
    return results[0], state
