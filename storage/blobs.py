"""Tensors plus a JSON document in one safetensors blob: the unit that every tensor store writes.

Keeping the metadata inside the safetensors header (`__metadata__["reverie"]`) means one object per
save, so a reader can never pair tensors with the metadata of another write. safetensors never
executes code on load, which is the point: nothing here is ever unpickled.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save
from safetensors.torch import load as torch_load
from safetensors.torch import save as torch_save

from storage.errors import CorruptDataError

_META_KEY = "reverie"
_NUMPY_DTYPES = {torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64,
                 torch.uint8, torch.bool}


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; views that share storage are copied (safetensors refuses them)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, expected torch.Tensor")
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in storages and tensor.numel():
            tensor = tensor.clone()
            ptr = tensor.untyped_storage().data_ptr()
        storages.add(ptr)
        out[name] = tensor
    return out


def _meta_header(meta: Mapping[str, Any]) -> dict[str, str]:
    try:
        return {_META_KEY: json.dumps(dict(meta), sort_keys=True)}
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata must be JSON-serialisable: {e}") from e


def pack_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> bytes:
    """One safetensors blob holding `tensors` and the JSON document `meta`.

    Tensors of numpy's dtypes go through safetensors' numpy writer: the same bytes at a quarter of
    the torch writer's Python time (serving saves every user's fast state after each turn, on
    threads that share the GIL with the model). Others (bfloat16, float8) take the torch writer.
    """
    cpu = _cpu_tensors(tensors)
    if any(tensor.dtype not in _NUMPY_DTYPES for tensor in cpu.values()):
        return torch_save(cpu, metadata=_meta_header(meta))
    return np_save({name: tensor.numpy() for name, tensor in cpu.items()}, metadata=_meta_header(meta))


def pack_arrays(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bytes:
    """As `pack_tensors`, for numpy arrays (FAISS keys)."""
    return np_save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=_meta_header(meta))


def read_meta(data: bytes, where: str) -> dict[str, Any]:
    """The JSON document stored by `pack_*`; CorruptDataError names `where` if the header is bad."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        if length > len(data) - 8:
            raise ValueError(f"header length {length} exceeds the {len(data)} bytes present (truncated?)")
        header = json.loads(data[8 : 8 + length])
        meta = json.loads(header.get("__metadata__", {})[_META_KEY])
        if not isinstance(meta, dict):
            raise ValueError("metadata is not a JSON object")
        return meta
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptDataError(
            f"{where} is not a Reverie safetensors blob ({e}); delete or restore it from a backup"
        ) from e


def unpack_tensors(data: bytes, where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata from `pack_tensors` output; CorruptDataError names `where`."""
    meta = read_meta(data, where)
    try:
        return torch_load(data), meta
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CorruptDataError(f"{where} has unreadable tensors ({e}); delete or restore it from a backup") from e


def unpack_arrays(data: bytes, where: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and metadata from `pack_arrays` output; CorruptDataError names `where`."""
    meta = read_meta(data, where)
    try:
        return np_load(data), meta
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CorruptDataError(f"{where} has unreadable arrays ({e}); delete or restore it from a backup") from e
