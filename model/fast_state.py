"""FastState: everything that changes while serving, as one fixed-size, serializable value.

It is data, not hidden module attributes: the model takes a FastState and returns a new one, so
serving, storage and the sleep can hold, save, batch and snapshot it without touching modules.
Row i of every tensor belongs to one user; a state's size never depends on how many bytes it saw.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from model.config import ModelConfig


@dataclass
class FastState:
    """Per-user plastic state. Shapes use b = users, n = layers, B = blocks, d = d_model."""

    pos: torch.Tensor  # (b,) int64: bytes seen so far
    writes: torch.Tensor  # (b,) int64: memory writes so far (PM + EM)
    scan_h: torch.Tensor  # (b, n, d): recurrence carries
    wm_k: torch.Tensor  # (b, W, d): working-memory keys, a ring buffer
    wm_v: torch.Tensor  # (b, W, d)
    wm_pos: torch.Tensor  # (b, W) int64: absolute position of each slot, -1 when empty
    pm_k: torch.Tensor  # (b, n, r, d): procedural memory keys
    pm_v: torch.Tensor  # (b, n, r, d): values
    pm_s: torch.Tensor  # (b, n, r): strengths (0 = empty)
    pm_elig_k: torch.Tensor  # (b, n, d): eligibility trace of the current span
    pm_elig_v: torch.Tensor  # (b, n, d)
    em_k: torch.Tensor  # (b, B, M, d): episodic items
    em_v: torch.Tensor  # (b, B, M, d)
    em_s: torch.Tensor  # (b, B, M)
    em_elig_k: torch.Tensor  # (b, B, d)
    em_elig_v: torch.Tensor  # (b, B, d)

    @classmethod
    def empty(cls, config: ModelConfig, batch: int = 1, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> "FastState":
        """The baseline: no memories, no context. Running with it and learn=False is 'plasticity off'."""
        b, n, nb, d = batch, config.n_layers, config.n_blocks, config.d_model
        zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
        return cls(
            pos=torch.zeros(b, dtype=torch.int64, device=device),
            writes=torch.zeros(b, dtype=torch.int64, device=device),
            scan_h=zeros(b, n, d),
            wm_k=zeros(b, config.window, d), wm_v=zeros(b, config.window, d),
            wm_pos=torch.full((b, config.window), -1, dtype=torch.int64, device=device),
            pm_k=zeros(b, n, config.pm_rank, d), pm_v=zeros(b, n, config.pm_rank, d),
            pm_s=zeros(b, n, config.pm_rank),
            pm_elig_k=zeros(b, n, d), pm_elig_v=zeros(b, n, d),
            em_k=zeros(b, nb, config.em_slots, d), em_v=zeros(b, nb, config.em_slots, d),
            em_s=zeros(b, nb, config.em_slots),
            em_elig_k=zeros(b, nb, d), em_elig_v=zeros(b, nb, d),
        )

    # --- generic tensor plumbing -------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def map(self, fn) -> "FastState":
        return FastState(**{name: fn(t) for name, t in self.tensors().items()})

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def clone(self) -> "FastState":
        return self.map(lambda t: t.clone())

    def detach(self) -> "FastState":
        return self.map(lambda t: t.detach())

    def to(self, device: torch.device | str) -> "FastState":
        return self.map(lambda t: t.to(device))

    def rows(self, index: slice | list[int] | torch.Tensor) -> "FastState":
        """The users at `index`, as a smaller batch."""
        return self.map(lambda t: t[index])

    @staticmethod
    def cat(states: list["FastState"]) -> "FastState":
        """Stack several users' states into one batch."""
        columns = zip(*(s.tensors().values() for s in states))
        return FastState(**{name: torch.cat(parts) for name, parts in zip(states[0].tensors(), columns)})

    def soft_reset(self, keep: float) -> "FastState":
        """Decay memory strengths by `keep` after a sleep: what they held now lives in weights."""
        if not 0.0 <= keep <= 1.0:
            raise ValueError(f"soft_reset keep must be in [0, 1], got {keep}")
        state = self.clone()
        state.pm_s = state.pm_s * keep
        state.em_s = state.em_s * keep
        return state

    def after_promotion(self, config: ModelConfig, keep: float) -> "FastState":
        """This state under a newly promoted version of `config`: soft-reset by `keep`, or empty
        when it does not fit `config` (the sleep changed the architecture)."""
        try:
            self.validate(config)
        except ValueError:
            return FastState.empty(config, self.batch_size, device=self.pos.device)
        return self.soft_reset(keep)

    def write_counts(self) -> dict[str, int]:
        """Sizes and counters that are safe to show (never the contents)."""
        return {"bytes_seen": int(self.pos.sum()), "memory_writes": int(self.writes.sum()),
                "pm_slots_used": int((self.pm_s > 0).sum()), "em_slots_used": int((self.em_s > 0).sum()),
                "nbytes": self.nbytes}

    # --- checks and serialization ------------------------------------------------------------
    def validate(self, config: ModelConfig) -> None:
        """Raise ValueError naming the first tensor whose shape or dtype does not fit `config`."""
        expected = FastState.empty(config, self.batch_size, device="meta")
        for name, want in expected.tensors().items():
            got = getattr(self, name)
            if tuple(got.shape) != tuple(want.shape):
                raise ValueError(f"FastState.{name} has shape {tuple(got.shape)}, but this model "
                                 f"({config.d_model=}, {config.n_layers=}) expects {tuple(want.shape)}")
            if got.dtype.is_floating_point != want.dtype.is_floating_point:
                raise ValueError(f"FastState.{name} has dtype {got.dtype}, expected {want.dtype}")
            if got.dtype.is_floating_point and not torch.isfinite(got).all():
                raise ValueError(f"FastState.{name} contains NaN or inf; reset this user's state")

    def to_bytes(self, config: ModelConfig) -> bytes:
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
        return save_safetensors_bytes(tensors, metadata={"model_config": config.to_json()})

    @classmethod
    def from_bytes(cls, data: bytes, config: ModelConfig) -> "FastState":
        """Load a state saved by `to_bytes`, checking it was made for this model's config."""
        try:
            tensors = load_safetensors_bytes(data)
        except (SafetensorError, ValueError, OSError) as error:
            raise ValueError(f"fast state is not a readable safetensors blob ({error}); "
                             f"delete it to start this user from an empty state") from error
        names = {f.name for f in dataclasses.fields(cls)}
        if set(tensors) != names:
            raise ValueError(f"fast state has tensors {sorted(tensors)}, expected {sorted(names)}")
        state = cls(**tensors)
        state.validate(config)
        return state

    def save(self, path: str | Path, config: ModelConfig) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(self.to_bytes(config))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, config: ModelConfig) -> "FastState":
        return cls.from_bytes(Path(path).read_bytes(), config)

