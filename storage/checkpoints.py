"""The checkpoint registry: versioned slow weights and the atomically promoted `current` pointer.

Layout under the store root:

    checkpoints/v0001/weights.safetensors   tensors (safetensors: never pickle)
    checkpoints/v0001/manifest.json         version, parent, created, weights sha256, caller's fields
    checkpoints/CURRENT.json                {"version", "previous", "promoted_at", "nonce"}

A version number is claimed by creating its weights file with `create_if_absent`, so two
concurrent `save`s can never take the same number; the manifest is written last and is the commit
marker (a version without one is an interrupted save and is ignored, its number never reused).

`promote` moves CURRENT with compare-and-swap, in the shape of a table format's commit: the caller
says which version it believes is current, and exactly one of several concurrent promoters with
the same belief wins; the others get a `ConflictError` naming both versions. The nonce makes every
pointer document unique, so CAS tokens (content hashes/ETags) never repeat (no ABA).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import torch

from storage.blobs import pack_tensors, unpack_tensors
from storage.config import StorageConfig
from storage.errors import ConflictError, CorruptDataError, NotFoundError, StorageError
from storage.uri import Store, as_store

PREFIX = "checkpoints"
POINTER = f"{PREFIX}/CURRENT.json"
_VERSION = re.compile(r"^v(\d{4,})$")
_RESERVED = {"version", "parent", "created", "weights"}


def _version_name(number: int) -> str:
    return f"v{number:04d}"


def _version_number(version: str) -> int:
    match = _VERSION.match(version)
    if not match:
        raise ValueError(f"{version!r} is not a checkpoint version; versions look like 'v0007'")
    return int(match.group(1))


class CheckpointRegistry:
    """Saves, lists, loads and promotes slow-weight versions; see the module docstring."""

    def __init__(self, store_or_uri: Store | str | None = None, storage_config: StorageConfig | None = None) -> None:
        self.store = as_store(store_or_uri, storage_config)

    # -- versions ------------------------------------------------------------------------------
    def save(self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], parent: str | None) -> str:
        """Store a new version and return its id (`v0001`, `v0002`, ... in save order).

        `manifest` holds the caller's fields (metrics, model config or genome, ...); the registry
        adds version, parent, created and the weights' checksum, and refuses those keys from the caller.
        """
        clash = _RESERVED & manifest.keys()
        if clash:
            raise ValueError(f"manifest keys {sorted(clash)} are set by the registry; rename them")
        if parent is not None and parent not in self.versions():
            raise ValueError(f"parent {parent} is not a saved version; saved: {self.versions()}")
        try:
            json.dumps(manifest)  # fail before a version number is claimed
        except (TypeError, ValueError) as e:
            raise TypeError(f"manifest must be JSON-serialisable: {e}") from e
        number = self._next_number()
        while True:
            version = _version_name(number)
            # The nonce makes the blob unique, so a retried create can tell its own write apart.
            weights = pack_tensors(tensors, {"version": version, "nonce": uuid.uuid4().hex})
            if self.store.create_if_absent(self._weights_key(version), weights):
                break
            number += 1  # a concurrent save took this number
        document = {
            **manifest,
            "version": version,
            "parent": parent,
            "created": datetime.now(UTC).isoformat(),
            "weights": {
                "file": "weights.safetensors",
                "sha256": hashlib.sha256(weights).hexdigest(),
                "bytes": len(weights),
            },
        }
        data = json.dumps(document, indent=2, sort_keys=True).encode()
        self.store.write_bytes(self._manifest_key(version), data)
        return version

    def versions(self) -> list[str]:
        """Committed versions (those with a manifest), oldest first."""
        found = []
        for key in self.store.list(PREFIX + "/"):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == "manifest.json" and _VERSION.match(parts[1]):
                found.append(parts[1])
        return sorted(found, key=_version_number)

    def manifest(self, version: str) -> dict[str, Any]:
        key = self._manifest_key(version)
        try:
            data = self.store.read_bytes(key)
        except NotFoundError:
            raise NotFoundError(
                f"checkpoint {version} does not exist in {self.store.uri}; saved: {self.versions()}"
            ) from None
        try:
            document = json.loads(data)
            if not isinstance(document, dict) or document.get("version") != version:
                raise ValueError("not a manifest of this version")
            return document
        except ValueError as e:
            raise CorruptDataError(
                f"manifest {self.store.uri_of(key)} is unreadable ({e}); restore it or delete the version"
            ) from e

    def load(self, version: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The version's tensors and manifest; CorruptDataError if the weights fail their checksum."""
        manifest = self.manifest(version)
        key = self._weights_key(version)
        data = self.store.read_bytes(key)
        expected = manifest.get("weights", {}).get("sha256")
        if hashlib.sha256(data).hexdigest() != expected:
            raise CorruptDataError(
                f"checkpoint weights {self.store.uri_of(key)} do not match the sha256 in its manifest "
                f"({len(data)} bytes read); restore the file or delete version {version}"
            )
        tensors, _ = unpack_tensors(data, self.store.uri_of(key))
        return tensors, manifest

    def _next_number(self) -> int:
        """One past every number ever claimed, committed or not, so numbers are never reused."""
        numbers = []
        for key in self.store.list(PREFIX + "/v"):
            match = _VERSION.match(key.split("/")[1])
            if match:
                numbers.append(int(match.group(1)))
        return max(numbers, default=0) + 1

    @staticmethod
    def _weights_key(version: str) -> str:
        return f"{PREFIX}/{version}/weights.safetensors"

    @staticmethod
    def _manifest_key(version: str) -> str:
        _version_number(version)
        return f"{PREFIX}/{version}/manifest.json"

    # -- the current pointer -------------------------------------------------------------------
    def current(self) -> str | None:
        """The promoted version, or None before the first promotion."""
        try:
            return self._read_pointer()[0]
        except NotFoundError:
            return None

    def _read_pointer(self) -> tuple[str, str]:
        data, token = self.store.read_with_token(POINTER)
        try:
            return json.loads(data)["version"], token
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptDataError(
                f"{self.store.uri_of(POINTER)} is unreadable ({e}); rewrite it with the intended version"
            ) from e

    def promote(self, version: str, expected_current: str | None) -> None:
        """Make `version` current if and only if `expected_current` still is (None: nothing is yet).

        Raises ConflictError naming both versions when another promoter got there first.
        """
        self.manifest(version)  # only committed versions may become current
        document = {
            "version": version,
            "previous": expected_current,
            "promoted_at": datetime.now(UTC).isoformat(),
            "nonce": uuid.uuid4().hex,
        }
        data = json.dumps(document, sort_keys=True).encode()
        if expected_current is None:
            if not self.store.create_if_absent(POINTER, data):
                self._conflict(version, expected_current)
            return
        try:
            actual, token = self._read_pointer()
        except NotFoundError:
            actual, token = None, ""
        if actual != expected_current:
            self._conflict(version, expected_current, actual)
        try:
            self.store.compare_and_swap(POINTER, data, token)
        except ConflictError:
            self._conflict(version, expected_current)

    def _conflict(self, version: str, expected: str | None, actual: str | None = None) -> None:
        actual = actual if actual is not None else self.current()
        raise ConflictError(
            f"promotion of {version} refused: it expected current to be {expected or 'unset'}, "
            f"but current is {actual or 'unset'} (another promoter won); re-read current() and decide again"
        )

    def rollback(self) -> str:
        """Promote the parent of the current version (with CAS); returns the version now current."""
        current = self.current()
        if current is None:
            raise StorageError(f"nothing to roll back in {self.store.uri}: no version has been promoted")
        parent = self.manifest(current).get("parent")
        if parent is None:
            raise StorageError(f"cannot roll back {current}: it has no parent version")
        self.promote(parent, expected_current=current)
        return parent
