"""Validation of one device's update, before any aggregation sees it.

An update is trusted for nothing. `validate_update` checks, in this order, and the first failure
rejects the update with a reason code and a message that names what was wrong:

    stale-round    the update claims another round than the current one (a replay)
    base-version   it was computed against other weights than this round's
    size-limit     its arrays hold more bytes than a well-formed update (checked before decoding)
    malformed      arrays other than exactly `signs` and `scales`
    dtype / shape  not uint8 signs of the announced length, not float32 scales, one per matrix
    non-finite     a NaN or infinite scale
    scale-bound    a negative scale, or one above `max_scale`

Everything before `non-finite` runs on the declared dtype, shape and byte count, so an oversized
or mistyped upload is refused without being deserialized. No Flower import: the strategy hands
in plain values, and tests call this directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from federation.wire import NPY_HEADER_ALLOWANCE, SCALES, SIGNS, from_wire, payload_nbytes
from model.bitdelta import BitDelta, packed_length

REASONS = ("stale-round", "base-version", "size-limit", "malformed", "dtype", "shape", "non-finite",
           "scale-bound")


class UpdateRejected(ValueError):
    """An update that must not be aggregated; `code` is one of REASONS."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ArraySpec:
    """What a received array declares about itself, readable without deserializing it."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int  # bytes on the wire, framing included


@dataclass(frozen=True)
class RoundExpectation:
    """What every update of one round must match; built by the server when it sends the round."""

    server_round: int
    model_version: str  # the version of the weights sent this round; deltas must be against it
    shapes: dict[str, tuple[int, ...]]  # matrices in wire order
    max_scale: float
    max_upload_bytes: int = 0  # 0 = a well-formed update's payload plus .npy framing

    @property
    def upload_limit(self) -> int:
        if self.max_upload_bytes:
            return self.max_upload_bytes
        return payload_nbytes(self.shapes) + 2 * NPY_HEADER_ALLOWANCE

    @property
    def signs_length(self) -> int:
        return sum(packed_length(math.prod(s)) for s in self.shapes.values())


def check_envelope(claimed_round: object, claimed_version: object, specs: Mapping[str, ArraySpec],
                   expect: RoundExpectation) -> None:
    """Every check that needs no deserialization: round, version, size, keys, dtypes, shapes."""
    if not isinstance(claimed_round, int) or isinstance(claimed_round, bool):
        raise UpdateRejected("malformed", f"the update carries no integer round number (got {claimed_round!r})")
    if claimed_round != expect.server_round:
        when = "an old round: replay" if claimed_round < expect.server_round else "a future round"
        raise UpdateRejected("stale-round", f"update is for round {claimed_round}, the current round is "
                                            f"{expect.server_round} ({when})")
    if claimed_version != expect.model_version:
        raise UpdateRejected("base-version", f"update was computed against {claimed_version!r}, "
                                             f"this round's weights are {expect.model_version!r}")
    total = sum(spec.nbytes for spec in specs.values())
    if total > expect.upload_limit:
        raise UpdateRejected("size-limit", f"update holds {total:,} bytes, the limit is {expect.upload_limit:,}")
    if set(specs) != {SIGNS, SCALES}:
        raise UpdateRejected("malformed", f"update arrays are {sorted(specs)}, expected exactly "
                                          f"{[SCALES, SIGNS]}")
    signs, scales = specs[SIGNS], specs[SCALES]
    if signs.dtype != "uint8" or scales.dtype != "float32":
        raise UpdateRejected("dtype", f"signs must be uint8 and scales float32, got {signs.dtype} and "
                                      f"{scales.dtype}")
    if signs.shape != (expect.signs_length,):
        raise UpdateRejected("shape", f"signs have shape {signs.shape}, expected ({expect.signs_length},) "
                                      f"for {len(expect.shapes)} matrices")
    if scales.shape != (len(expect.shapes),):
        raise UpdateRejected("shape", f"scales have shape {scales.shape}, expected ({len(expect.shapes)},)")


def check_scales(scales: np.ndarray, expect: RoundExpectation) -> None:
    """Finite, non-negative and at most max_scale; the message names the matrix."""
    for name, value in zip(expect.shapes, scales.tolist()):
        if not math.isfinite(value):
            raise UpdateRejected("non-finite", f"scale of {name!r} is {value}")
        if value < 0 or value > expect.max_scale:
            raise UpdateRejected("scale-bound", f"scale of {name!r} is {value:.4g}, outside "
                                                f"[0, {expect.max_scale:g}]")


def validate_update(claimed_round: object, claimed_version: object, specs: Mapping[str, ArraySpec],
                    load: Callable[[], Mapping[str, np.ndarray]], expect: RoundExpectation) -> BitDelta:
    """Check an update and decode it into a BitDelta, or raise UpdateRejected.

    load: deserializes the arrays; it is called only after the envelope passed.
    """
    check_envelope(claimed_round, claimed_version, specs, expect)
    try:
        arrays = load()
    except ValueError as error:  # e.g. a truncated .npy body
        raise UpdateRejected("malformed", f"arrays could not be decoded: {error}") from None
    signs, scales = np.asarray(arrays[SIGNS]), np.asarray(arrays[SCALES])
    actual = {SIGNS: ArraySpec(str(signs.dtype), signs.shape, specs[SIGNS].nbytes),
              SCALES: ArraySpec(str(scales.dtype), scales.shape, specs[SCALES].nbytes)}
    check_envelope(claimed_round, claimed_version, actual, expect)  # the body must match its header
    check_scales(scales, expect)
    try:
        return from_wire(signs, scales, expect.shapes, expect.model_version, expect.max_scale)
    except ValueError as error:  # a second line of defence: BitDelta's own validation
        raise UpdateRejected("malformed", str(error)) from None
