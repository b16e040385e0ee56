"""Weight deltas tied to the slow weights they apply to: per user (private) and aggregated (shared).

    deltas/<base>/users/<user>.safetensors          one user's personal delta (e.g. BitDelta)
    deltas/<base>/aggregates/<name>.safetensors     e.g. a Flower round's robust aggregate

`<base>` is the slow-weights version the delta was computed against; a delta is meaningless on
other weights, so lookups are always by (owner, base) and a delta for another base is never
returned. Tensors are whatever the producer stores (uint8 packed sign bits, fp32 scales, ...);
metadata is a JSON document inside the same safetensors blob.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from storage.blobs import pack_tensors, unpack_tensors
from storage.config import StorageConfig
from storage.errors import CorruptDataError, NotFoundError
from storage.uri import Store, as_store, decode_component, encode_component

PREFIX = "deltas"
_SUFFIX = ".safetensors"


class AggregateDelta(NamedTuple):
    name: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


class DeltaStore:
    """Per-user and aggregated deltas keyed by base version; see the module docstring."""

    def __init__(self, store_or_uri: Store | str | None = None, storage_config: StorageConfig | None = None) -> None:
        self.store = as_store(store_or_uri, storage_config)

    @staticmethod
    def _key(base_version: str, kind: str, name: str) -> str:
        return f"{PREFIX}/{encode_component(base_version)}/{kind}/{encode_component(name)}{_SUFFIX}"

    def _save(
        self, kind: str, owner: str, base_version: str, tensors: dict[str, torch.Tensor], meta: dict | None
    ) -> None:
        meta = meta or {}
        if meta.get("base_version", base_version) != base_version:
            raise ValueError(
                f"delta metadata says base {meta['base_version']!r} but it is being saved for {base_version!r}"
            )
        document = {**meta, "owner": owner, "kind": kind, "base_version": base_version}
        self.store.write_bytes(self._key(base_version, kind, owner), pack_tensors(tensors, document))

    def _load(self, kind: str, owner: str, base_version: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        key = self._key(base_version, kind, owner)
        try:
            data = self.store.read_bytes(key)
        except NotFoundError:
            return None
        tensors, meta = unpack_tensors(data, self.store.uri_of(key))
        if (meta.get("owner"), meta.get("base_version")) != (owner, base_version):
            raise CorruptDataError(
                f"{self.store.uri_of(key)} is labelled {meta.get('owner')!r} on {meta.get('base_version')!r}, "
                f"expected {owner!r} on {base_version!r}; delete it"
            )
        return tensors, meta

    def _names(self, base_version: str, kind: str) -> list[str]:
        prefix = f"{PREFIX}/{encode_component(base_version)}/{kind}/"
        names = (key[len(prefix) :] for key in self.store.list(prefix))
        return [decode_component(n[: -len(_SUFFIX)]) for n in names if n.endswith(_SUFFIX) and "/" not in n]

    # -- per user ------------------------------------------------------------------------------
    def save_user_delta(
        self, user_id: str, base_version: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
    ) -> None:
        self._save("users", user_id, base_version, tensors, meta)

    def load_user_delta(self, user_id: str, base_version: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The user's delta on `base_version`, or None (also when only deltas on other bases exist)."""
        return self._load("users", user_id, base_version)

    def delete_user_delta(self, user_id: str, base_version: str) -> None:
        self.store.delete(self._key(base_version, "users", user_id))

    def users(self, base_version: str) -> list[str]:
        """Users with a personal delta on `base_version`."""
        return self._names(base_version, "users")

    def user_bases(self, user_id: str) -> list[str]:
        """Base versions for which `user_id` has a personal delta."""
        return [base for base in self.base_versions() if user_id in self.users(base)]

    # -- aggregates ----------------------------------------------------------------------------
    def save_aggregate(
        self, name: str, base_version: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
    ) -> None:
        self._save("aggregates", name, base_version, tensors, meta)

    def load_aggregate(self, name: str, base_version: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        return self._load("aggregates", name, base_version)

    def aggregates(self, base_version: str) -> list[str]:
        """Names of the aggregates on `base_version`."""
        return self._names(base_version, "aggregates")

    def load_aggregates(self, base_version: str) -> list[AggregateDelta]:
        """Every aggregate on `base_version`, sorted by name."""
        loaded = []
        for name in self.aggregates(base_version):
            found = self.load_aggregate(name, base_version)
            if found is not None:  # deleted between listing and loading
                loaded.append(AggregateDelta(name, *found))
        return loaded

    # -- listing -------------------------------------------------------------------------------
    def base_versions(self) -> list[str]:
        """Base versions that have any delta."""
        bases = {key.split("/")[1] for key in self.store.list(PREFIX + "/") if key.count("/") == 3}
        return sorted(decode_component(b) for b in bases)
