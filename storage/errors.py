"""Errors raised by `storage`.

Every message says what was wrong and what to do about it, so that a log line is enough to act on
without reading this package. Callers catch the narrowest class that they can handle:

- `StorageError`: the store could not be read or written (network, permissions, disk, a full
  spool). Usually transient; retrying later is the right response.
- `NotFoundError`: a key that was asked for does not exist (also a `FileNotFoundError`).
- `ConflictError`: a conditional write lost a race (compare-and-swap, create-once). Re-read the
  current state and decide again; retrying blindly is wrong.
- `CorruptDataError`: bytes were read but do not parse (truncated Parquet, bad safetensors, bad
  JSON, a checksum mismatch). Retrying does not help; the named object needs repair or removal.
"""

from __future__ import annotations


class StorageError(Exception):
    """The store failed to read or write; the message names the object and the likely cause."""


class NotFoundError(StorageError, FileNotFoundError):
    """The key does not exist in the store."""


class ConflictError(StorageError):
    """A conditional write lost: someone else changed the object since it was read."""


class CorruptDataError(StorageError):
    """An object exists but its contents cannot be parsed or fail their checksum."""
