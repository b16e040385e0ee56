"""The model's Triton kernel modules (model/scan_kernel.py, model/write_kernel.py,
model/loop_kernel.py), imported on first use: Triton is optional (CPU machines may lack it) and
slow to import, so nothing imports those modules at the top."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def triton_kernels(module: str) -> ModuleType | None:
    """The module of Triton kernels named `module` (e.g. "model.scan_kernel"), or None without Triton."""
    try:
        return importlib.import_module(module)
    except ImportError:  # pragma: no cover - depends on the machine
        return None
