"""The model's Triton kernel modules (model/scan_kernel.py, model/write_kernel.py,
model/loop_kernel.py), imported on first use: Triton is optional (CPU machines may lack it) and
slow to import, so nothing imports those modules at the top."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch


@functools.cache
def triton_kernels(module: str) -> ModuleType | None:
    """The module of Triton kernels named `module` (e.g. "model.scan_kernel"), or None without Triton."""
    try:
        return importlib.import_module(module)
    except ImportError:  # pragma: no cover - depends on the machine
        return None


@torch.compiler.assume_constant_result
def kernels_available(module: str) -> bool:
    """Whether `triton_kernels(module)` has kernels. A constant to torch.compile: traced, the import
    it may run is a graph break (the decode step's write split its compiled graph in five, session
    19), and the answer never changes within a process."""
    return triton_kernels(module) is not None
