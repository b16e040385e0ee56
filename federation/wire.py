"""The upload format of a device: one BitDelta as two flat arrays.

    signs   (sum_m ceil(n_m / 8),) uint8    every matrix's packed sign bits, concatenated
    scales  (M,) float32                    one scale per matrix

in the matrix order the server announced (`select_matrices` of the shared model). Two arrays
instead of two per matrix keep the per-array framing (~128 bytes of .npy header each) out of the
upload, which matters for small models: for the tiny preset it is 2% of the payload instead of 45%.
Shapes never travel: the server knows them, and trusting a device's shapes would let it choose
what it gets validated against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from model.bitdelta import BitDelta, packed_length

SIGNS = "signs"
SCALES = "scales"
NPY_HEADER_ALLOWANCE = 256  # bytes of .npy framing allowed per array on top of the payload


def payload_nbytes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Bytes of signs plus scales for these matrices (what BitDelta.nbytes counts)."""
    return sum(packed_length(math.prod(s)) for s in shapes.values()) + 4 * len(shapes)


def dense_nbytes(shapes: Mapping[str, tuple[int, ...]], bytes_per_weight: int) -> int:
    """Bytes of the same delta sent densely: 2 per weight for fp16, 4 for fp32."""
    return bytes_per_weight * sum(math.prod(s) for s in shapes.values())


def to_wire(delta: BitDelta, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The two upload arrays of `delta`, matrices in the order of `names`."""
    missing = [n for n in names if n not in delta.shapes]
    if missing:
        raise ValueError(f"the delta has no entry for matrix {missing[0]!r} that the server asked for")
    signs = np.concatenate([delta.signs[n].detach().cpu().numpy() for n in names]).astype(np.uint8, copy=False)
    scales = np.array([float(delta.scales[n]) for n in names], dtype=np.float32)
    return {SIGNS: signs, SCALES: scales}


def from_wire(signs: np.ndarray, scales: np.ndarray, shapes: Mapping[str, tuple[int, ...]],
              base_version: str, max_scale: float) -> BitDelta:
    """Split the upload arrays back into a validated BitDelta (ValueError says what is wrong)."""
    lengths = [packed_length(math.prod(s)) for s in shapes.values()]
    if signs.dtype != np.uint8 or signs.ndim != 1 or signs.size != sum(lengths):
        raise ValueError(f"signs must be a 1-D uint8 array of {sum(lengths)} bytes, "
                         f"got {signs.dtype} of shape {signs.shape}")
    if scales.dtype != np.float32 or scales.shape != (len(shapes),):
        raise ValueError(f"scales must be a float32 array of shape ({len(shapes)},), "
                         f"got {scales.dtype} of shape {scales.shape}")
    offsets = np.cumsum([0, *lengths])
    names = list(shapes)
    delta = BitDelta(
        signs={n: torch.from_numpy(signs[offsets[i]:offsets[i + 1]].copy()) for i, n in enumerate(names)},
        scales={n: torch.tensor(float(scales[i]), dtype=torch.float32) for i, n in enumerate(names)},
        shapes=dict(shapes),
        base_version=base_version,
    )
    delta.validate(max_scale)
    return delta
