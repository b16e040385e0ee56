"""One settings object for a federated run, read from Flower's run config in one place.

Every field is a key of `[tool.flwr.app.config]` in pyproject.toml, spelled with dashes
(`num_server_rounds` <-> `num-server-rounds`), and can be overridden per run with
`flwr run . --run-config 'aggregation="sign-vote"'`. Missing keys take the defaults below, so the
apps also run under `flwr.simulation.run_simulation`, whose run config is empty.

The client recipe (local steps, learning rate, which matrices) is sent by the server with every
round, so all devices of a round follow the same recipe whatever version of the app they run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

AGGREGATIONS = ("clipped-mean", "trimmed-mean", "sign-vote")
BASES = ("current", "scratch")
SELECTIONS = ("linear", "2d")


@dataclass(frozen=True)
class FederationSettings:
    # -- the run (server) --------------------------------------------------------------------
    num_server_rounds: int = 3
    min_clients: int = 2  # wait for this many connected SuperNodes; sample at least this many
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    round_timeout: float = 600.0  # seconds to wait for replies: a dead device never blocks a round
    store: str = ""  # data root URI (file:// or s3://); "" = REVERIE_DATA or ./reverie-data
    base: str = "current"  # "current" = the promoted checkpoint; "scratch" = a seeded fresh model
    preset: str = "tiny"  # model preset for "scratch" (and for checkpoints that do not record one)
    seed: int = 0
    aggregate_name: str = ""  # name in the delta store; "" = federated-<base>-<run tag>
    summary_path: str = ""  # also write the run summary (JSON) here; "" = do not
    # -- validation of updates ------------------------------------------------------------------
    max_scale: float = 0.0  # bound on every BitDelta scale (a matrix's mean |delta|); 0 = local-lr * local-steps
    max_upload_bytes: int = 0  # 0 = exactly the size of a well-formed update of this model
    # -- robust aggregation --------------------------------------------------------------------
    aggregation: str = "clipped-mean"  # clipped-mean | trimmed-mean | sign-vote
    clip_norm: float = 0.0  # L2 bound per update; 0 = the median norm of the round's updates
    trim_fraction: float = 0.2  # trimmed-mean: drop this fraction at each end of every coordinate
    server_lr: float = 1.0  # global weights += server_lr * aggregate
    outlier_ratio: float = 3.0  # log an update as bounded when its norm exceeds this x the median
    dp_noise_multiplier: float = 0.0  # > 0: Gaussian noise of std z * clip_norm / n (needs clip-norm)
    # -- the client recipe (sent to devices each round) ----------------------------------------
    local_steps: int = 20
    local_lr: float = 3e-3
    batch_size: int = 8
    seq_len: int = 64
    select: str = "linear"  # which matrices carry the delta: every nn.Linear, or every 2-D parameter
    distill_steps: int = 10  # BitDelta scale distillation on the device's own bytes
    # -- simulation only -----------------------------------------------------------------------
    attackers: str = ""  # "<partition>:<attack> ...", e.g. "3:nan 7:flip"; see federation.attacks
    client_bytes: int = 6000  # synthetic training bytes per simulated device

    def __post_init__(self) -> None:
        problems = []
        if self.num_server_rounds < 1:
            problems.append(f"num-server-rounds must be >= 1, got {self.num_server_rounds}")
        if self.min_clients < 1:
            problems.append(f"min-clients must be >= 1, got {self.min_clients}")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{_key(name)} must be in [0, 1], got {getattr(self, name)}")
        if self.aggregation not in AGGREGATIONS:
            problems.append(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.base not in BASES:
            problems.append(f"base must be one of {BASES}, got {self.base!r}")
        if self.select not in SELECTIONS:
            problems.append(f"select must be one of {SELECTIONS}, got {self.select!r}")
        if not 0.0 <= self.trim_fraction < 0.5:
            problems.append(f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}")
        for name in ("server_lr", "outlier_ratio", "round_timeout", "local_lr"):
            if not getattr(self, name) > 0:
                problems.append(f"{_key(name)} must be > 0, got {getattr(self, name)}")
        for name in ("max_scale", "clip_norm", "dp_noise_multiplier", "max_upload_bytes", "distill_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{_key(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("local_steps", "batch_size", "seq_len", "client_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{_key(name)} must be >= 1, got {getattr(self, name)}")
        if self.dp_noise_multiplier > 0 and (self.aggregation != "clipped-mean" or self.clip_norm <= 0):
            problems.append("dp-noise-multiplier > 0 needs aggregation=\"clipped-mean\" and a fixed "
                            "clip-norm > 0: the noise is calibrated to a bound that must not depend on the data")
        if problems:
            raise ValueError("invalid federation settings: " + "; ".join(problems))

    @property
    def scale_bound(self) -> float:
        """The bound on BitDelta scales. Adam moves a weight by about lr per step at most, so a
        matrix's mean |delta| after `local_steps` steps stays below local_lr * local_steps."""
        return self.max_scale if self.max_scale > 0 else self.local_lr * self.local_steps

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationSettings:
        """Settings from a Flower run config (dashed keys); unknown keys are an error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        unknown = []
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                unknown.append(key)
                continue
            values[name] = _coerce(key, value, type(getattr(cls(), name)))
        if unknown:
            raise ValueError(f"unknown federation settings {sorted(unknown)}; known: {sorted(map(_key, fields))}")
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """The dashed-key table for `[tool.flwr.app.config]` or `--run-config`."""
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> FederationSettings:
        return dataclasses.replace(self, **changes)


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, kind: type) -> Any:
    """TOML gives ints where floats are meant (`clip-norm = 1`); accept those, refuse the rest."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"federation setting {key} must be {kind.__name__}, got {value!r}")
    return value
