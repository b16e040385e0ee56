"""Robust aggregation of validated BitDeltas into one dense delta, with optional central DP.

Every update is first decoded to its dense form (scale * sign per matrix) and flattened into one
vector, so all methods see the same (n, P) matrix of n updates over P weights:

    clipped-mean  scale each update down to L2 norm <= bound (a fixed clip-norm, or the median
                  norm of the round), then average. One update moves the mean by at most bound / n.
    trimmed-mean  per coordinate, drop the k = floor(trim_fraction * n) largest and smallest values,
                  average the rest (Yin et al. 2018). Needs fewer than n / 2 attackers per coordinate.
    sign-vote     per coordinate, the majority sign of the updates (signSGD with majority vote,
                  Bernstein et al. 2019) times the median scale of that matrix: the natural
                  aggregate of 1-bit deltas, and an oversized scale counts no more than any other.

Optional differential privacy (clipped-mean with a fixed bound C only): Gaussian noise of
standard deviation z * C / n on every coordinate of the mean, as in DP-FedAvg (McMahan et al.
2018); z is the noise multiplier and is reported with the result.

Updates whose norm exceeds `outlier_ratio` times the round median, or that point against the
aggregate (negative cosine), are reported as bounded outliers so the server can log them.
Plain torch, no Flower: tests call these functions directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model.bitdelta import BitDelta

METHODS = ("clipped-mean", "trimmed-mean", "sign-vote")


@dataclass(frozen=True)
class RobustConfig:
    method: str = "clipped-mean"
    clip_norm: float = 0.0  # 0 = the median norm of the round's updates
    trim_fraction: float = 0.2
    outlier_ratio: float = 3.0
    dp_noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"aggregation method must be one of {METHODS}, got {self.method!r}")
        if self.dp_noise_multiplier > 0 and (self.method != "clipped-mean" or self.clip_norm <= 0):
            raise ValueError("differential privacy needs method 'clipped-mean' with a fixed clip_norm > 0")


@dataclass
class Outlier:
    index: int  # position of the update in the aggregated list
    reason: str


@dataclass
class Aggregate:
    """The aggregate (dense fp32 per matrix) and what the server should report about it."""

    delta: dict[str, Tensor]
    method: str
    norms: list[float]  # L2 norm of every decoded update
    bound: float | None = None  # clipped-mean: the L2 bound every update was clipped to
    outliers: list[Outlier] = field(default_factory=list)
    noise_std: float = 0.0  # per coordinate; 0 without DP
    noise_multiplier: float = 0.0

    @property
    def norm(self) -> float:
        return math.sqrt(sum(float(t.float().pow(2).sum()) for t in self.delta.values()))


def stack_updates(deltas: Sequence[BitDelta]) -> tuple[Tensor, Tensor, list[int]]:
    """Decode n deltas over the same matrices: updates (n, P), scales (n, M), sizes [M] (sum = P)."""
    if not deltas:
        raise ValueError("nothing to aggregate: no update passed validation")
    shapes = deltas[0].shapes
    for i, delta in enumerate(deltas[1:], start=1):
        if delta.shapes != shapes:
            raise ValueError(f"update {i} covers other matrices than update 0; validate updates first")
    updates = torch.stack([torch.cat([d.dense(n).reshape(-1) for n in shapes]) for d in deltas])
    scales = torch.stack([torch.stack([d.scales[n].float() for n in shapes]) for d in deltas])
    sizes = [math.prod(s) for s in shapes.values()]
    return updates, scales, sizes


def clipped_mean(updates: Tensor, bound: float) -> Tensor:
    """updates (n, P) -> (P,): the mean after scaling each row to L2 norm <= bound."""
    norms = updates.norm(dim=1, keepdim=True)
    factors = torch.clamp(bound / norms.clamp_min(1e-12), max=1.0)
    return (updates * factors).mean(dim=0)


def trimmed_mean(updates: Tensor, fraction: float) -> Tensor:
    """updates (n, P) -> (P,): per coordinate, the mean without the k largest and k smallest."""
    n = updates.shape[0]
    k = min(int(math.floor(fraction * n)), (n - 1) // 2)
    ordered, _ = torch.sort(updates, dim=0)
    return ordered[k:n - k].mean(dim=0)


def sign_vote(updates: Tensor, scales: Tensor, sizes: Sequence[int]) -> Tensor:
    """updates (n, P), scales (n, M) -> (P,): majority sign times each matrix's median scale.

    A tied coordinate gets 0: the devices disagree, so the aggregate does not move it.
    """
    majority = torch.sign(torch.sign(updates).sum(dim=0))
    magnitude = scales.median(dim=0).values.repeat_interleave(torch.tensor(list(sizes)))
    return majority * magnitude


def aggregate(deltas: Sequence[BitDelta], config: RobustConfig = RobustConfig(),
              generator: torch.Generator | None = None) -> Aggregate:
    """Aggregate validated deltas robustly; see the module docstring for the methods."""
    updates, scales, sizes = stack_updates(deltas)
    norms = updates.norm(dim=1)
    median_norm = float(norms.median())
    bound = None
    if config.method == "clipped-mean":
        bound = config.clip_norm if config.clip_norm > 0 else median_norm
        vector = clipped_mean(updates, bound)
    elif config.method == "trimmed-mean":
        vector = trimmed_mean(updates, config.trim_fraction)
    else:
        vector = sign_vote(updates, scales, sizes)
    outliers = _outliers(updates, norms, vector, median_norm, bound, config.outlier_ratio)
    noise_std = 0.0
    if config.dp_noise_multiplier > 0:
        noise_std = config.dp_noise_multiplier * config.clip_norm / len(deltas)
        vector = vector + torch.randn(vector.shape, generator=generator) * noise_std
    names = list(deltas[0].shapes)
    pieces = torch.split(vector, sizes)
    delta = {n: p.reshape(deltas[0].shapes[n]).clone() for n, p in zip(names, pieces)}
    return Aggregate(delta=delta, method=config.method, norms=norms.tolist(), bound=bound, outliers=outliers,
                     noise_std=noise_std, noise_multiplier=config.dp_noise_multiplier)


def _outliers(updates: Tensor, norms: Tensor, vector: Tensor, median_norm: float, bound: float | None,
              ratio: float) -> list[Outlier]:
    found = []
    cosines = (updates @ vector) / (norms * vector.norm()).clamp_min(1e-12)
    for i, (norm, cosine) in enumerate(zip(norms.tolist(), cosines.tolist())):
        reasons = []
        if median_norm > 0 and norm > ratio * median_norm:
            reasons.append(f"norm {norm:.3g} is {norm / median_norm:.1f}x the round median")
        if cosine < 0:
            reasons.append(f"points against the aggregate (cosine {cosine:.2f})")
        if reasons:
            if bound is not None and norm > bound:
                reasons.append(f"clipped to norm {bound:.3g}")
            found.append(Outlier(i, "; ".join(reasons)))
    return found
