"""Where the local command line keeps its files under the data root."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from pipelines.settings import Settings


def local_root(settings: Settings) -> Path:
    """The data root as a local path; the trained-checkpoint files of `reverie train` live here."""
    parsed = urlparse(settings.storage.root)
    if parsed.scheme != "file":
        raise ValueError(f"this command needs a local data root, got {settings.storage.root}; "
                         f"set REVERIE_DATA to a directory")
    return Path(parsed.path)


def trained_checkpoint(settings: Settings, preset: str) -> Path:
    return local_root(settings) / "train" / f"{preset}.safetensors"


def user_state_file(settings: Settings, user: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in user)
    if not safe or safe.startswith("."):
        raise ValueError(f"user name {user!r} is not usable as a file name; use letters, digits, - or _")
    return local_root(settings) / "users" / f"{safe}.safetensors"
