"""Adaptive compute: a cheap complexity estimate picks how many layers a request runs.

Estimator. `complexity(data)` is the size of the request's bytes under raw deflate (zlib, no
header), in bits per byte: the same unit as the model's loss. Repetitive or templated input
(a pasted log, a table, a passage quoted twice) compresses to 1-3 bits per byte; fresh prose sits
near 5; random bytes near 8. It reads nothing but the bytes, costs microseconds (well under 5% of
a forward of even the tiny model; `tests/test_adaptive.py` checks that), and needs no training.

Policy. A `DepthPolicy` maps complexity to a layer count through thresholds calibrated on held-out
text (`calibrate`): the calibration texts are split into complexity bins of equal count; each bin
gets the fewest layers whose mean bits per byte are within `tolerance` of full depth on that bin,
made non-decreasing from easy bins to hard ones. Requests more complex than anything seen in
calibration run at full depth.

Exit. The chosen depth is passed to the model as `active_layers`: the first k layers run and the
shared head (final norm + tied embedding) reads their output. Train with
`TrainConfig.early_exit_weight > 0` so that the head reads intermediate depths well.

`AdaptiveDepth` composes estimator, policy and model; the model's `last_metrics` then reports
`complexity` beside the `active_params`, `active_layers` and `latency_ms` of the forward it ran,
plus `estimator_ms`.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.corpus import as_tensor
from model.fast_state import FastState
from model.lm import ReverieLM, bits_per_byte


def complexity(data: bytes) -> float:
    """Raw-deflate size of `data` in bits per byte (0 < c <= ~8.1 for non-empty data)."""
    if not data:
        raise ValueError("complexity of an empty request is undefined; send at least one byte")
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)  # negative wbits: raw deflate, no header/checksum
    return 8.0 * len(compressor.compress(data) + compressor.flush()) / len(data)


def tokens_complexity(tokens: torch.Tensor) -> float:
    """tokens: (b, T) bytes -> the complexity of the hardest row (one depth serves the whole batch)."""
    rows = tokens.detach().to("cpu", torch.uint8).numpy()
    return max(complexity(row.tobytes()) for row in rows)


@dataclass(frozen=True)
class DepthPolicy:
    """limits[k-1] is the highest complexity that k layers serve (k = 1..n_layers-1); -inf = never."""

    n_layers: int
    limits: tuple[float, ...]
    tolerance: float = 0.0  # bits per byte that calibration allowed an exit to lose

    def __post_init__(self) -> None:
        if len(self.limits) != self.n_layers - 1:
            raise ValueError(f"a policy for {self.n_layers} layers needs {self.n_layers - 1} limits, "
                             f"got {len(self.limits)}")
        if any(b < a for a, b in zip(self.limits, self.limits[1:])):
            raise ValueError(f"limits must be non-decreasing with depth, got {self.limits}")

    @classmethod
    def full_depth(cls, n_layers: int) -> DepthPolicy:
        return cls(n_layers, (-math.inf,) * (n_layers - 1))

    def layers_for(self, complexity: float) -> int:
        for k, limit in enumerate(self.limits, start=1):
            if complexity <= limit:
                return k
        return self.n_layers

    def to_dict(self) -> dict[str, Any]:
        return {"n_layers": self.n_layers, "tolerance": self.tolerance,
                "limits": [None if math.isinf(x) else x for x in self.limits]}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DepthPolicy:
        limits = tuple(-math.inf if x is None else float(x) for x in values["limits"])
        return cls(int(values["n_layers"]), limits, float(values.get("tolerance", 0.0)))


@torch.no_grad()
def exit_bpb(model: ReverieLM, texts: Sequence[bytes]) -> np.ndarray:
    """Bits per byte of every text at every exit depth: (n_texts, n_layers); column k-1 = k layers.

    Each text is one request: inputs text[:-1], targets text[1:], empty fast state.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    table = np.zeros((len(texts), model.config.n_layers))
    for i, text in enumerate(texts):
        data = as_tensor(text).to(device)
        inputs, targets = data[None, :-1], data[None, 1:]
        for k in range(1, model.config.n_layers + 1):
            logits, _ = model(inputs, active_layers=k)
            table[i, k - 1] = float(bits_per_byte(logits, targets))
    model.train(was_training)
    return table


def calibrate(model: ReverieLM, texts: Sequence[bytes], tolerance: float = 0.05,
              bins: int | None = None) -> DepthPolicy:
    """Thresholds from held-out requests `texts`; see the module docstring for the rule."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance is the bits per byte an exit may lose: it must be >= 0, got {tolerance}")
    if len(texts) < 2:
        raise ValueError(f"calibration needs at least 2 held-out texts, got {len(texts)}")
    n_layers = model.config.n_layers
    if n_layers == 1:
        return DepthPolicy.full_depth(1)
    scores = np.array([complexity(t[:-1]) for t in texts])
    lost = exit_bpb(model, texts)
    lost -= lost[:, -1:]  # bits per byte lost by exiting at each depth
    bins = bins or max(1, min(8, len(texts) // 8))
    depth, upper = 1, {}  # upper[k]: highest complexity of a bin served by k layers
    for members in np.array_split(np.argsort(scores, kind="stable"), bins):
        if len(members) == 0:
            continue
        enough = np.flatnonzero(lost[members].mean(axis=0) <= tolerance)
        depth = max(depth, int(enough[0]) + 1)
        upper[depth] = float(scores[members].max())
    limits, limit = [], -math.inf
    for k in range(1, n_layers):
        limit = max(limit, upper.get(k, -math.inf))
        limits.append(limit)
    return DepthPolicy(n_layers, tuple(limits), tolerance)


class AdaptiveDepth:
    """Runs each request at the depth its complexity calls for; the model is shared, not copied."""

    def __init__(self, model: ReverieLM, policy: DepthPolicy) -> None:
        if policy.n_layers != model.config.n_layers:
            raise ValueError(f"the policy was calibrated for {policy.n_layers} layers, the model has "
                             f"{model.config.n_layers}; calibrate it on this model")
        self.model, self.policy = model, policy

    def plan(self, tokens: torch.Tensor) -> tuple[float, int]:
        """tokens: (b, T) -> (complexity, layers to run)."""
        score = tokens_complexity(tokens)
        return score, self.policy.layers_for(score)

    def __call__(self, tokens: torch.Tensor, state: FastState | None = None, *, learn: bool = True,
                 layers: int | None = None) -> tuple[torch.Tensor, FastState]:
        """As `model(tokens, state)`, at the planned depth (or `layers`, e.g. the plan of a request's
        prompt reused for each byte it generates). Returns logits (b, T, 256) and the new FastState."""
        started = time.perf_counter()
        score, planned = self.plan(tokens)
        estimator_ms = (time.perf_counter() - started) * 1000.0
        logits, state = self.model(tokens, state, learn=learn, active_layers=layers or planned)
        self.model.last_metrics.update(complexity=score, estimator_ms=estimator_ms)
        return logits, state
