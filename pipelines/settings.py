"""Run settings for the `reverie` command and the flows: one file plus the environment.

Precedence: command-line flags > environment (REVERIE_*) > `reverie.toml` (or $REVERIE_CONFIG)
> defaults. Storage settings (data root, S3 endpoint) live in `storage.config.StorageConfig`.
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


@dataclass(frozen=True)
class Settings:
    preset: str = "tiny"  # model preset when no checkpoint exists yet
    device: str = "auto"  # "auto" = cuda when available, else cpu
    ray_address: str | None = None  # None = start a local Ray; "auto" or ray://host:10001 for a cluster
    storage: StorageConfig = field(default_factory=StorageConfig.from_env)

    ENV = {"preset": "REVERIE_PRESET", "device": "REVERIE_DEVICE", "ray_address": "RAY_ADDRESS"}

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
                values[name] = env[variable]
        storage = StorageConfig.from_env(env)
        if "data" in values and not env.get("REVERIE_DATA"):
            storage = dataclasses.replace(storage, root=values.pop("data"))
        values.pop("data", None)
        return cls(storage=storage, **values)
