"""Where a federated run starts and where its result goes: the checkpoint registry and the delta store.

The run starts from the promoted slow weights (`CheckpointRegistry.current()`), and its result,
the robust aggregate of every round summed, is saved with `DeltaStore.save_aggregate` under that
same base version, which is where the next sleep looks for shared deltas to consolidate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from federation import LOGGER_NAME
from model.config import ModelConfig, config_of_manifest, preset
from model.lm import ReverieLM
from storage.checkpoints import CheckpointRegistry
from storage.deltas import DeltaStore
from storage.uri import open_store

log = logging.getLogger(LOGGER_NAME)


@dataclass
class Base:
    """The shared weights a run starts from."""

    version: str  # checkpoint version ("v0007"), or "scratch-<preset>-s<seed>"
    config: ModelConfig
    weights: dict[str, torch.Tensor]


def _store(uri: str):
    return open_store(uri or None)


def load_base(store_uri: str, base: str, preset_name: str, seed: int) -> Base:
    """The promoted checkpoint of the store (base="current"), else a seeded fresh model.

    A store with no promoted checkpoint falls back to a fresh model with a warning, so that a
    first `flwr run .` works on an empty data root.
    """
    if base == "current":
        registry = CheckpointRegistry(_store(store_uri))
        version = registry.current()
        if version is not None:
            tensors, manifest = registry.load(version)
            config = config_of_manifest(manifest, preset_name)
            model = ReverieLM(config)
            model.load_state_dict(tensors)  # refuses tensors of another shape, naming them
            return Base(version=version, config=config, weights=_cpu(model.state_dict()))
        log.warning("no promoted checkpoint in %s; federating from a fresh %s model (seed %d)",
                    registry.store.uri, preset_name, seed)
    torch.manual_seed(seed)
    config = preset(preset_name)
    return Base(version=f"scratch-{preset_name}-s{seed}", config=config, weights=_cpu(ReverieLM(config).state_dict()))


def save_aggregate(store_uri: str, name: str, base_version: str, tensors: dict[str, torch.Tensor],
                   meta: dict[str, Any]) -> str:
    """Store the run's aggregate for the next sleep; returns where it went (for logs)."""
    deltas = DeltaStore(_store(store_uri))
    deltas.save_aggregate(name, base_version, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta)
    return f"{deltas.store.uri} deltas/{base_version}/aggregates/{name}"


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}
