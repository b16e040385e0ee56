"""The one-byte decoding step captured as CUDA graphs, for serving batches of any size.

Why: a small model's decode step is a few hundred tiny kernels, so on a GPU its time is the
host launching them (the serving bench measured 4-5 ms a step for `tiny` at 32 users on the
H100, most of a batch's time). A captured graph replays them in one launch. A serving replica
sees batches of every size, so a batch is padded to a bucket (the next power of two) and each
(bucket, learn) pair is captured once, on first use.

A graph reads fixed addresses: the users' state lives in static buffers (loaded before the
reply, read back after it), and the step copies its new state into them inside the graph. The
weights are read where they live, so loading a new version or a user's delta in place
(`load_weights`, `apply_delta`) is seen by the next replay; `DecodeGraphs` captures again only
when a parameter moved to new memory. Where no graph can be captured (a CPU), the same buffers
and steps run eagerly: that is what the tests check against `ReverieLM.step`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from model.fast_state import FastState
from model.lm import ReverieLM
from model.memory import SpanPlan, WriteRule, rules_held

log = logging.getLogger(__name__)


def sync_free_step(lm: ReverieLM, byte: torch.Tensor, state: FastState, learn: bool, donate_state: bool = False
                   ) -> tuple[torch.Tensor, FastState]:
    """`lm.step` without host syncs: whose span ends is a (b,) mask computed on the device, and the
    working memory takes its cached path (right for an empty cache too). byte (b,) -> logits (b, 1, 256)."""
    span = lm.config.span
    closes = (state.pos % span) + 1 == span
    return lm._run(byte[:, None], state, learn, lm.config.n_layers, SpanPlan.one_byte(closes, byte.shape[0]),
                   fresh=False, donate_state=donate_state)


class _Step(nn.Module):
    """`sync_free_step` as a module call, so `torch.func.functional_call` can swap weights for it."""

    def __init__(self, lm: ReverieLM, learn: bool, compile: bool) -> None:
        super().__init__()
        self.lm, self.learn = lm, learn
        self.run = torch.compile(sync_free_step, dynamic=False) if compile else sync_free_step

    def forward(self, byte: torch.Tensor, state: FastState) -> tuple[torch.Tensor, FastState]:
        return self.run(self.lm, byte, state, self.learn, donate_state=True)


class GraphedStep:
    """One decode step for a fixed batch of users, over static state buffers.

    `load` copies a state into the first rows; each call feeds one byte per user and returns their
    logits, advancing the buffers; `state` reads the rows back. Rows past the loaded users (a
    bucket's padding) hold whatever was there and are computed and ignored: users never mix.
    capture=False runs the same step eagerly (no CUDA); compile: the step goes through
    torch.compile first (inductor fuses its small ops), as `bench/gpu_suite.py` measures.
    matrix_dtype: for a step run under autocast, its matrices (`ReverieLM.autocast_matrices`) are
    held in this dtype, copied from the weights at every `load`: autocast would cast them at every
    step, ~0.27 ms of a 2.1 ms step of `base` at 256 users on the H200, the same values.
    """

    def __init__(self, lm: ReverieLM, batch: int, learn: bool, device: torch.device, capture: bool,
                 compile: bool = False, pool: tuple | None = None, dtype: torch.dtype = torch.float32,
                 matrix_dtype: torch.dtype | None = None) -> None:
        self.lm, self.batch, self.learn = lm, batch, learn
        self.step = _Step(lm, learn, compile)
        self.weights = lm.autocast_matrices() if matrix_dtype is not None else {}
        self.matrices = {name: weight.detach().to(matrix_dtype) for name, weight in self.weights.items()}
        with torch.no_grad():  # tensors of the step's own, never the memories' cached rule
            self.rules = {kind.__name__: kind._build_rule(memories) for kind, memories in lm.memories().items()}
        self.buffers = FastState.empty(lm.config, batch, device=device, dtype=dtype)
        self.byte = torch.zeros(batch, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor  # (batch, 256): the captured step's output, or the last eager step's
        if capture:
            self._capture(pool)

    def _advance(self) -> torch.Tensor:
        """The step from the buffers, its new state copied back into them. -> logits (batch, 256)."""
        if self.matrices and not torch.is_autocast_enabled(self.byte.device.type):
            raise RuntimeError("a GraphedStep with matrix_dtype runs (and is captured) under torch.autocast; "
                               "create and call it inside an autocast context, or leave matrix_dtype None")
        with rules_held(self.rules):
            logits, out = torch.func.functional_call(self.step, {f"lm.{name}": m for name, m in self.matrices.items()},
                                                     (self.byte, self.buffers))
        for name, tensor in out.tensors().items():
            target = getattr(self.buffers, name)
            if tensor is not target:  # a tensor written in place is the buffer itself
                target.copy_(tensor)
        return logits[:, 0]

    def _capture(self, pool: tuple | None) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # Warm-up: kernels built, workspaces allocated, a compiled step traced as it will be captured.
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(3):
                self._advance()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool), torch.no_grad():
            self.logits = self._advance()

    def load(self, state: FastState) -> None:
        """Put `state`'s users (at most `batch`) in the first rows of the buffers."""
        if state.batch_size > self.batch:
            raise ValueError(f"{state.batch_size} users do not fit a decode graph for {self.batch}")
        for name, tensor in state.tensors().items():
            getattr(self.buffers, name)[:state.batch_size].copy_(tensor)
        # Weights loaded in place since the last batch (a version, a delta): the matrices and the
        # write rules the graph reads are copies, made again.
        if self.matrices:
            torch._foreach_copy_(list(self.matrices.values()), [w.detach() for w in self.weights.values()])
        with torch.no_grad():
            for kind, memories in self.lm.memories().items():
                held, fresh = self.rules[kind.__name__], kind._build_rule(memories)
                torch._foreach_copy_(_tensors(held), _tensors(fresh))

    @torch.no_grad()
    def __call__(self, byte: torch.Tensor) -> torch.Tensor:
        """byte (n,) for the n loaded users -> their logits (n, 256), a view valid until the next call."""
        users = byte.shape[0]
        self.byte[:users].copy_(byte)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = self._advance()
        return self.logits[:users]

    def state(self, users: int) -> FastState:
        """The first `users` rows of the buffers, as a state of their own (a copy)."""
        return self.buffers.rows(slice(0, users)).clone()


def _tensors(rule: WriteRule) -> list[torch.Tensor]:
    return [t for t in (rule.w1, rule.b1, rule.w2, rule.b2, rule.sharpness) if t is not None]


@dataclass(frozen=True)
class DecodeGraphConfig:
    max_batch: int = 64  # larger batches decode eagerly (their launches are spread over more users)
    capture: bool | None = None  # None: capture where the model is on a CUDA device; False: run eagerly
    compile: bool = False  # torch.compile each step before capture (slower to start, fewer kernels)


class DecodeGraphs:
    """The graphed steps of one model, by (bucket, learn), captured on first use."""

    def __init__(self, lm: ReverieLM, config: DecodeGraphConfig = DecodeGraphConfig()) -> None:
        if config.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {config.max_batch}")
        self.lm, self.config = lm, config
        self.device = next(lm.parameters()).device
        self.capture = self.device.type == "cuda" if config.capture is None else config.capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {self.device}")
        self._steps: dict[tuple[int, bool, torch.dtype], GraphedStep] = {}
        self._addresses = self._parameter_addresses()
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None

    def _parameter_addresses(self) -> list[int]:
        return [p.data_ptr() for p in self.lm.parameters()]

    @staticmethod
    def bucket(users: int) -> int:
        """The batch a graph is captured for: the next power of two."""
        return 1 << max(users - 1, 0).bit_length()

    def step_for(self, state: FastState, learn: bool) -> GraphedStep | None:
        """The step that decodes `state`'s users, loaded with it; None where they decode eagerly
        (more users than max_batch, or a state on another device than the model)."""
        users = state.batch_size
        if users > self.config.max_batch or state.pos.device != self.device:
            return None
        addresses = self._parameter_addresses()
        if addresses != self._addresses:  # parameters replaced, not written in place: graphs read old memory
            log.info("model parameters moved; capturing the decode graphs again")
            self._steps.clear()
            self._addresses = addresses
        key = (self.bucket(users), learn, state.scan_h.dtype)
        step = self._steps.get(key)
        if step is None:
            log.info("capturing the decode step for %d users (learn=%s)", key[0], learn)
            step = GraphedStep(self.lm, key[0], learn, self.device, self.capture, self.config.compile, self._pool,
                               key[2])
            self._steps[key] = step
        step.load(state)
        return step
