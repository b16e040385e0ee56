"""A bounded local spool: finished files that could not reach the store yet.

A writer that cannot reach its store parks each finished Parquet file here under the key it was
meant to have, and uploads it later under that same key, so an upload that is repeated after a
crash overwrites identical bytes instead of duplicating records. Files land atomically
(`LocalStore`), so a crash mid-spool leaves at most a hidden temp file, never a torn one.

The bound is the point: when the spool is full, `put` refuses with a `StorageError` and the writer
keeps the records in memory and applies backpressure, rather than silently dropping anything or
filling the disk.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from storage.errors import StorageError
from storage.local_store import LocalStore

log = logging.getLogger(__name__)

_STALE_TEMP_S = 3600.0


class Spool:
    """Files waiting for `store_uri`, kept under `directory/<hash of store_uri>/<key>`."""

    def __init__(self, directory: str | Path, store_uri: str, max_bytes: int) -> None:
        digest = hashlib.sha256(store_uri.encode()).hexdigest()[:16]
        self.directory = Path(directory) / digest
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / ".store_uri").write_text(store_uri + "\n")  # for operators: whose files these are
        self.max_bytes = max_bytes
        self._files = LocalStore(str(self.directory))
        self._remove_stale_temps()
        self.nbytes = 0
        self.pending()  # counts nbytes

    def _remove_stale_temps(self) -> None:
        """Temp files of writers that were killed mid-spool; recent ones may belong to a live writer."""
        cutoff = time.time() - _STALE_TEMP_S
        for path in self.directory.rglob(".*.tmp"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                pass  # its writer finished with it meanwhile

    def _size(self, key: str) -> int:
        try:
            return (self.directory / key).stat().st_size
        except FileNotFoundError:
            return 0

    def pending(self) -> list[str]:
        """Keys waiting for upload, oldest name first (names start with a timestamp).

        Also re-counts `nbytes`, since another writer sharing this directory may have drained files.
        """
        keys = sorted(self._files.list(), key=lambda k: k.rsplit("/", 1)[-1])
        self.nbytes = sum(self._size(key) for key in keys)
        return keys

    def put(self, key: str, data: bytes | memoryview) -> None:
        if self.nbytes + len(data) > self.max_bytes:
            raise StorageError(
                f"spool {self.directory} is full ({self.nbytes} of {self.max_bytes} bytes) and the store is "
                "unreachable; records stay in memory. Restore access to the store or raise max_spool_bytes"
            )
        self._files.write_bytes(key, data)
        self.nbytes += len(data)

    def read(self, key: str) -> bytes:
        return self._files.read_bytes(key)

    def remove(self, key: str) -> None:
        self.nbytes = max(0, self.nbytes - self._size(key))
        self._files.delete(key)
