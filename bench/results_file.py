"""Results files that several runs fill: each run replaces its own section and keeps the others'."""

from __future__ import annotations

import json
from pathlib import Path


def save_section(path: Path, name: str, section: dict) -> None:
    """Write `section` under `name` in the JSON file at `path`, keeping the file's other sections
    (runs on another device, or of another setting)."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results[name] = section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
