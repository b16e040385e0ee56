"""Per-user fast state (PM/EM tensors, scan carries) as one safetensors blob per user.

    fast_states/<encoded user id>.safetensors

The metadata inside the blob must name the slow-weights version the state was built against
(`base_version`): a fast state is only meaningful on top of those weights, and serving checks it
after a promotion before reusing the state. One blob per save keeps tensors and metadata in step.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import torch

from storage.blobs import pack_tensors, unpack_tensors
from storage.config import StorageConfig
from storage.errors import CorruptDataError, NotFoundError
from storage.uri import Store, as_store, decode_component, encode_component

PREFIX = "fast_states"
_SUFFIX = ".safetensors"


class FastStateStore:
    """Saves and loads each user's fast state; see the module docstring."""

    def __init__(self, store_or_uri: Store | str | None = None, storage_config: StorageConfig | None = None) -> None:
        self.store = as_store(store_or_uri, storage_config)

    def _key(self, user_id: str) -> str:
        return f"{PREFIX}/{encode_component(user_id)}{_SUFFIX}"

    def save(self, user_id: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Replace the user's state atomically. `meta["base_version"]` is required."""
        if not isinstance(meta.get("base_version"), str):
            raise ValueError(
                f"fast state of {user_id!r} needs meta['base_version']: the slow-weights version it was built on"
            )
        document = {**meta, "user_id": user_id, "saved_at": datetime.now(UTC).isoformat()}
        self.store.write_bytes(self._key(user_id), pack_tensors(tensors, document))

    def load(self, user_id: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, meta), or None if the user has no saved state."""
        key = self._key(user_id)
        try:
            data = self.store.read_bytes(key)
        except NotFoundError:
            return None
        tensors, meta = unpack_tensors(data, self.store.uri_of(key))
        if meta.get("user_id") != user_id:
            raise CorruptDataError(
                f"{self.store.uri_of(key)} holds the state of {meta.get('user_id')!r}, not {user_id!r}; delete it"
            )
        return tensors, meta

    def delete(self, user_id: str) -> None:
        self.store.delete(self._key(user_id))

    def users(self) -> list[str]:
        """User ids with a saved state, sorted by their encoded form."""
        names = (key[len(PREFIX) + 1 :] for key in self.store.list(PREFIX + "/"))
        return [decode_component(n[: -len(_SUFFIX)]) for n in names if n.endswith(_SUFFIX) and "/" not in n]
