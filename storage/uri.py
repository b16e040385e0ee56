"""One URI layer: `file://` and `s3://` behind one `Store` interface.

Callers name objects by *key* (`experience/date=2025-01-02/part-x.parquet`) relative to a store's
root and never ask which backend they hold: `LocalStore` and `S3Store` implement the same
contract, including the two conditional writes that make pointers safe to move:

- `create_if_absent(key, data)`: exactly one concurrent creator gets True.
- `compare_and_swap(key, data, token)`: succeeds only if the object still has the content that
  `read_with_token` returned `token` for; otherwise `ConflictError`.

Tokens are content fingerprints (S3 ETags, SHA-256 locally). Two writes of identical bytes have the
same token, so documents that move back and forth (a "current" pointer) carry a nonce.

Keys are `/`-separated; no component may be empty, `.`/`..`, or start with `.`: dot-names are
reserved for temp and lock files, which every listing (ours and pyarrow.dataset's) ignores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from urllib.parse import quote, unquote

import pyarrow.fs as pafs

from storage.config import StorageConfig


class Store(ABC):
    """Bytes by key under one root URI, plus the pyarrow filesystem for Parquet on the same root."""

    uri: str

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; `NotFoundError` if absent."""

    @abstractmethod
    def read_with_token(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and the token that `compare_and_swap` expects; `NotFoundError` if absent."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes | memoryview) -> None:
        """Replace the object atomically: readers see the old bytes or the new, never a mix.

        A memoryview (of an Arrow buffer, say) is written without a copy where the backend allows.
        """

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys that start with `prefix` (string prefix, as S3 lists), temp files excluded."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error."""

    @abstractmethod
    def create_if_absent(self, key: str, data: bytes) -> bool:
        """Write only if the key does not exist; True if this call created it."""

    @abstractmethod
    def compare_and_swap(self, key: str, data: bytes, expected_token: str) -> str:
        """Replace only if the content still matches `expected_token`; returns the new token.

        Raises `ConflictError` if the object changed or vanished since it was read.
        """

    @abstractmethod
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem for Parquet/datasets on this store."""

    @abstractmethod
    def path(self, key: str = "") -> str:
        """The path of `key` inside `filesystem()` (no scheme)."""

    def uri_of(self, key: str) -> str:
        """A full URI for messages and logs: `s3://bucket/prefix/key` or `file:///root/key`."""
        return self.uri.rstrip("/") + "/" + key if key else self.uri

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def check_key(key: str, *, prefix: bool = False) -> str:
    """Validate a key (or a listing prefix); returns it unchanged or raises ValueError."""
    if not prefix and not key:
        raise ValueError("storage key is empty")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"storage key {key!r} must be relative, '/'-separated and without NUL")
    parts = key.split("/")
    if prefix:
        parts = parts[:-1]  # the last part of a prefix may be partial or empty
    for part in parts:
        if not part or part in (".", "..") or part.startswith("."):
            raise ValueError(
                f"storage key {key!r} has an empty, '.'/'..' or dot-prefixed component; "
                "dot-names are reserved for temp and lock files"
            )
    return key


def encode_component(name: str) -> str:
    """A user id, version or aggregate name as one safe key component (reversible, readable).

    Percent-encodes everything but ASCII letters, digits, '-' and '_', so '/', '..', a leading dot
    and non-ASCII ids all become plain file names that mean the same thing on every backend.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name {name!r} must be a non-empty string")
    encoded = quote(name, safe="-_").replace(".", "%2E").replace("~", "%7E")
    if len(encoded) > 200:
        raise ValueError(f"name {name[:40]!r}... is too long to be a key component ({len(encoded)} bytes encoded)")
    return encoded


def decode_component(component: str) -> str:
    return unquote(component)


def open_store(uri: str | None = None, config: StorageConfig | None = None) -> Store:
    """The store for `uri` (default: `config.root`, default config: `StorageConfig.from_env()`)."""
    config = config or StorageConfig.from_env()
    uri = uri or config.root
    # Backends import this module for `Store`, so they are imported here, when first needed.
    if uri.startswith("s3://"):
        from storage.s3_store import S3Store

        return S3Store(uri, config)
    from storage.local_store import LocalStore

    return LocalStore(uri)


def as_store(store_or_uri: Store | str | None, config: StorageConfig | None = None) -> Store:
    """Accept a `Store`, a URI, or None (the configured root) wherever a store is needed."""
    if isinstance(store_or_uri, Store):
        return store_or_uri
    return open_store(store_or_uri, config)
