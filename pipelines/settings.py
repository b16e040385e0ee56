"""Run settings for the `reverie` command and the flows: one file plus the environment.

Precedence: command-line flags > environment (REVERIE_*, RAY_ADDRESS) > `reverie.toml` (or
$REVERIE_CONFIG) > defaults. Storage settings (data root, S3 endpoint) live in
`storage.config.StorageConfig`. docs/environment.md lists every variable the code reads.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.config import StorageConfig

CONFIG_FILE = "reverie.toml"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Settings:
    preset: str = "tiny"  # model preset when no checkpoint exists yet
    device: str = "auto"  # "auto" = cuda when available, else cpu
    ray_address: str | None = None  # None = start a local Ray; "auto" or ray://host:10001 for a cluster
    # The shared sleep on Ray Train: how many workers, one GPU each or CPUs, and the run directory,
    # which on a cluster of several nodes must be storage every node reaches (NFS path or s3://).
    sleep_workers: int = 1
    sleep_gpu: bool = False
    # Each user's night as a Ray task on this share of a GPU (0.25: four nights share one); 0 = a CPU.
    user_night_gpus: float = 0.0
    # The night's recipe, a name in model.consolidation.METHODS: "reverie_fast" for a model that
    # already knows its language (a bulk night ~1.36x faster, as much kept; bench/NOTES.md, session 23).
    sleep_recipe: str = "reverie"
    train_storage: str | None = None  # None = <local data root>/ray_train, else a local temp dir
    storage: StorageConfig = field(default_factory=StorageConfig.from_env)

    ENV = {"preset": "REVERIE_PRESET", "device": "REVERIE_DEVICE", "ray_address": "RAY_ADDRESS",
           "sleep_workers": "REVERIE_SLEEP_WORKERS", "sleep_gpu": "REVERIE_SLEEP_GPU",
           "user_night_gpus": "REVERIE_USER_NIGHT_GPUS", "sleep_recipe": "REVERIE_SLEEP_RECIPE",
           "train_storage": "REVERIE_TRAIN_STORAGE"}

    @classmethod
    def load(cls, path: str | Path | None = None, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ) if env is None else env
        values: dict[str, Any] = {}
        file = Path(path or env.get("REVERIE_CONFIG") or CONFIG_FILE)
        if file.exists():
            try:
                values.update(tomllib.loads(file.read_text()).get("reverie", {}))
            except tomllib.TOMLDecodeError as error:
                raise ValueError(f"{file} is not valid TOML ({error}); fix it or unset REVERIE_CONFIG") from error
        known = {f.name for f in dataclasses.fields(cls)} - {"storage"}
        unknown = sorted(set(values) - known - {"data"})
        if unknown:
            raise ValueError(f"{file}: unknown settings {unknown} in [reverie]; known: {sorted(known | {'data'})}")
        for name, variable in cls.ENV.items():
            if env.get(variable):
                values[name] = _parse(variable, env[variable], type(getattr(cls, name)))
        storage = StorageConfig.from_env(env)
        if "data" in values and not env.get("REVERIE_DATA"):
            storage = dataclasses.replace(storage, root=values.pop("data"))
        values.pop("data", None)
        return cls(storage=storage, **values)


def _parse(variable: str, text: str, kind: type) -> Any:
    """An environment variable's text as the setting's type (bool, int and float settings; else the text)."""
    if kind is bool:
        if text.strip().lower() not in _TRUE + _FALSE:
            raise ValueError(f"{variable}={text!r} is not a yes/no value; use 1 or 0 (true/false)")
        return text.strip().lower() in _TRUE
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"{variable}={text!r} is not {'an integer' if kind is int else 'a number'}") from None
    return text
