"""One configuration dataclass for ReverieLM, and the named presets that are tested."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

FeedForward = Literal["dense", "mixture"]
GateForm = Literal["sigmoid", "exp"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network and of its fast memory (Brain-Core v2 names in comments)."""

    vocab_size: int = 256  # bytes: no tokenizer
    d_model: int = 256
    n_blocks: int = 2  # B
    layers_per_block: int = 2  # L
    n_heads: int = 4  # heads of the one shared working-memory attention
    span: int = 64  # P: PM/EM are read-only inside a span, written at its end
    window: int = 256  # W: working-memory sliding window
    pm_rank: int = 8  # r: slots of each procedural-memory fast-weight adapter
    em_slots: int = 256  # M: items per block of episodic memory
    em_topk: int = 4  # items retrieved per query
    ff_mult: int = 4
    ff_type: FeedForward = "dense"
    gate: GateForm = "sigmoid"  # how the recurrence gate a_t is formed
    max_seq_len: int = 2048  # longest input of one forward call
    pm_decay: float = 0.95  # strength decay of PM at every write
    em_decay: float = 0.99  # strength decay of EM at every write
    pm_budget: float = 4.0  # bound on the sum of PM strengths per instance
    em_budget: float = 64.0  # bound on the sum of EM strengths per block

    def __post_init__(self) -> None:
        problems = []
        if self.vocab_size != 256:
            problems.append(f"vocab_size must be 256 (bytes), got {self.vocab_size}")
        if self.d_model % self.n_heads:
            problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        for name in ("d_model", "n_blocks", "layers_per_block", "span", "window", "pm_rank",
                     "em_slots", "em_topk", "ff_mult", "max_seq_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.em_topk > self.em_slots:
            problems.append(f"em_topk={self.em_topk} exceeds em_slots={self.em_slots}")
        if self.ff_type not in ("dense", "mixture"):
            problems.append(f"ff_type must be 'dense' or 'mixture', got {self.ff_type!r}")
        if self.gate not in ("sigmoid", "exp"):
            problems.append(f"gate must be 'sigmoid' or 'exp', got {self.gate!r}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def n_layers(self) -> int:
        return self.n_blocks * self.layers_per_block

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**values)

    def diff(self, other: "ModelConfig") -> list[str]:
        """Human-readable differences, used in 'checkpoint of another config' errors."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}={theirs[k]} vs {mine[k]}" for k in mine if mine[k] != theirs[k]]


PRESETS: dict[str, ModelConfig] = {
    # Trains in seconds on a CPU core; used by the tests.
    "tiny": ModelConfig(d_model=64, n_blocks=2, layers_per_block=1, n_heads=2, span=16, window=32,
                        pm_rank=4, em_slots=16, em_topk=2, ff_mult=2, max_seq_len=512),
    # ~10M parameters: CPU benchmarks and the demo.
    "small": ModelConfig(d_model=256, n_blocks=2, layers_per_block=6, n_heads=4, span=64,
                         window=256, max_seq_len=2048),
    # ~125M parameters: GPU training and benchmarks.
    "base": ModelConfig(d_model=768, n_blocks=4, layers_per_block=4, n_heads=12, span=64,
                        window=256, max_seq_len=2048),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def config_of_manifest(manifest: dict[str, Any], fallback_preset: str | None = None) -> ModelConfig:
    """The model config a checkpoint manifest records: under "model_config" (sleeps, federation) or
    "config" (`reverie train`, serving's first version), else its "preset", else `fallback_preset`."""
    for key in ("model_config", "config"):
        if isinstance(manifest.get(key), dict):
            return ModelConfig.from_dict(manifest[key])
    name = manifest.get("preset") if isinstance(manifest.get("preset"), str) else fallback_preset
    if name is None:
        raise ValueError("the checkpoint manifest records no model config ('model_config', 'config' or 'preset'); "
                         "was it saved by another program?")
    return preset(name)
