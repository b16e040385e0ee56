"""Malicious devices, for simulations and tests of the server's defences.

A simulated SuperNode whose partition id appears in the run config's `attackers`
("<partition>:<attack> ...") computes its honest update and then corrupts it:

    nan    one scale is NaN                               -> rejected (non-finite)
    inf    one scale is +inf                              -> rejected (non-finite)
    shape  the signs array is 16 bytes short               -> rejected (shape)
    scale  one scale is 1000x the honest one               -> rejected (scale-bound)
    bloat  an extra 1 MB array rides along                 -> rejected (size-limit)
    stale  the update claims the previous round            -> rejected (stale-round)
    flip   every sign inverted, every scale raised to       -> passes validation; bounded by the
           just under the announced bound: the most           robust aggregate and logged as an
           damaging update that validation lets through       outlier
Real devices never read this: `attackers` is empty unless a simulation sets it.
"""

from __future__ import annotations

import numpy as np

from federation.wire import SCALES, SIGNS

ATTACKS = ("nan", "inf", "shape", "scale", "bloat", "stale", "flip")
FLIP_FRACTION = 0.95  # flip: scales at this fraction of the announced max-scale


def parse_attackers(spec: str) -> dict[int, str]:
    """'3:nan 7:flip' (spaces or commas) -> {3: 'nan', 7: 'flip'}."""
    attackers = {}
    for item in spec.replace(",", " ").split():
        partition, _, attack = item.partition(":")
        if not partition.isdigit() or attack not in ATTACKS:
            raise ValueError(f"attacker {item!r} must look like '<partition id>:<attack>' with an attack "
                             f"in {ATTACKS}")
        attackers[int(partition)] = attack
    return attackers


def corrupt(arrays: dict[str, np.ndarray], attack: str, server_round: int,
            max_scale: float) -> tuple[dict[str, np.ndarray], int]:
    """The corrupted upload arrays and the round number the attacker claims.

    max_scale: the scale bound the server announced with the recipe (the flip attack uses it).
    """
    signs, scales = arrays[SIGNS].copy(), arrays[SCALES].copy()
    claimed_round = server_round
    if attack == "nan":
        scales[0] = np.nan
    elif attack == "inf":
        scales[-1] = np.inf
    elif attack == "shape":
        signs = signs[:-16]
    elif attack == "scale":
        scales[0] = scales[0] * 1000.0 + 1.0
    elif attack == "bloat":
        return {SIGNS: signs, SCALES: scales, "padding": np.zeros(1 << 20, dtype=np.uint8)}, claimed_round
    elif attack == "stale":
        claimed_round = server_round - 1
    elif attack == "flip":
        signs = np.bitwise_not(signs)
        scales = np.full_like(scales, FLIP_FRACTION * max_scale)
    else:
        raise ValueError(f"unknown attack {attack!r}; known: {ATTACKS}")
    return {SIGNS: signs, SCALES: scales}, claimed_round
