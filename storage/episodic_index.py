"""Persistence for episodic-memory indexes: the raw keys and their metadata, FAISS rebuilt on load.

We store the vectors, not a serialized FAISS index: the keys are the durable fact, while an
index's binary format is tied to the FAISS version and index type. A flat index over a few thousand
keys rebuilds in milliseconds. Keys and metadata travel in one safetensors blob, so they can never
be out of step.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from storage.blobs import pack_arrays, unpack_arrays
from storage.config import StorageConfig
from storage.errors import CorruptDataError
from storage.uri import Store, as_store

_INDEXES = {"ip": faiss.IndexFlatIP, "l2": faiss.IndexFlatL2}


def save_episodic_index(
    store: Store | str | None,
    key: str,
    keys: np.ndarray,
    metadata: list[dict[str, Any]],
    metric: str = "ip",
    storage_config: StorageConfig | None = None,
) -> None:
    """Store `keys` (n, d) float32 and one JSON-serialisable dict per key at `key`.

    metric: "ip" (inner product, for normalised keys) or "l2"; it picks the index rebuilt on load.
    """
    if metric not in _INDEXES:
        raise ValueError(f"metric {metric!r} is not one of {sorted(_INDEXES)}")
    keys = np.asarray(keys)
    if keys.ndim != 2:
        raise ValueError(f"episodic keys must be (n, d), got shape {keys.shape}")
    if len(metadata) != keys.shape[0]:
        raise ValueError(f"{keys.shape[0]} keys but {len(metadata)} metadata entries; they must pair up")
    keys = keys.astype(np.float32, copy=False)
    if not np.isfinite(keys).all():
        raise ValueError("episodic keys contain NaN or inf; refusing to store an index that cannot be searched")
    blob = pack_arrays({"keys": keys}, {"metric": metric, "dim": keys.shape[1], "metadata": metadata})
    as_store(store, storage_config).write_bytes(key, blob)


def load_episodic_index(
    store: Store | str | None, key: str, storage_config: StorageConfig | None = None
) -> tuple[faiss.Index, list[dict[str, Any]]]:
    """The rebuilt index (ids are row numbers into the metadata list) and the metadata."""
    store = as_store(store, storage_config)
    where = store.uri_of(key)
    arrays, meta = unpack_arrays(store.read_bytes(key), where)
    keys, metadata, metric = arrays.get("keys"), meta.get("metadata"), meta.get("metric")
    if keys is None or keys.ndim != 2 or metric not in _INDEXES or not isinstance(metadata, list):
        raise CorruptDataError(f"{where} is not an episodic index (keys, metric, metadata missing); delete it")
    if len(metadata) != keys.shape[0] or keys.shape[1] != meta.get("dim"):
        raise CorruptDataError(f"{where}: {keys.shape} keys do not match {len(metadata)} metadata entries; delete it")
    index = _INDEXES[metric](int(keys.shape[1]))
    index.add(np.ascontiguousarray(keys, dtype=np.float32))
    return index, metadata
