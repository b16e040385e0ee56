"""`file://` backend: a directory tree whose writes are atomic and whose CAS is lock-protected.

Atomicity comes from the POSIX rename rules: data is written to a dot-named temp file in the
target's own directory, fsynced, then `os.replace`d (overwrite) or `os.link`ed (create-once, fails
if the name exists) into place. Compare-and-swap holds an exclusive `fcntl.flock` on a dot-named
lock file beside the key while it checks and replaces, so concurrent processes on one host
serialize. (flock is not reliable on NFS; use S3 for multi-host pointers.)
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from storage.config import to_uri
from storage.errors import ConflictError, NotFoundError, StorageError
from storage.uri import Store, check_key


def _token(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalStore(Store):
    """Objects are files under `root`; see the module docstring for the atomicity rules."""

    def __init__(self, uri: str) -> None:
        self.uri = to_uri(uri).rstrip("/")
        self.root = Path(unquote(urlparse(self.uri).path))
        self._fs = pafs.LocalFileSystem()

    # -- reads ---------------------------------------------------------------------------------
    def _file(self, key: str) -> Path:
        return self.root / check_key(key)

    def read_bytes(self, key: str) -> bytes:
        path = self._file(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"{self.uri_of(key)} does not exist") from None
        except OSError as e:
            raise StorageError(f"reading {self.uri_of(key)} failed: {e}; check permissions and the disk") from e

    def read_with_token(self, key: str) -> tuple[bytes, str]:
        data = self.read_bytes(key)
        return data, _token(data)

    def exists(self, key: str) -> bool:
        return self._file(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        check_key(prefix, prefix=True)
        base = self.root / prefix.rpartition("/")[0]
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    # -- writes --------------------------------------------------------------------------------
    @contextmanager
    def _staged(self, key: str, data: bytes | memoryview) -> Iterator[tuple[Path, Path]]:
        """Write `data` to a fsynced temp file beside `key`; yields (temp, final); cleans up."""
        final = self._file(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise StorageError(f"writing {self.uri_of(key)} failed: {e}; check free space and permissions") from e
        try:
            yield tmp, final
        finally:
            tmp.unlink(missing_ok=True)

    def _sync_dir(self, directory: Path) -> None:
        """Persist a rename: without this a power cut can forget the new directory entry."""
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_bytes(self, key: str, data: bytes | memoryview) -> None:
        with self._staged(key, data) as (tmp, final):
            try:
                os.replace(tmp, final)
                self._sync_dir(final.parent)
            except OSError as e:
                raise StorageError(f"writing {self.uri_of(key)} failed: {e}") from e

    def create_if_absent(self, key: str, data: bytes) -> bool:
        with self._staged(key, data) as (tmp, final):
            try:
                os.link(tmp, final)  # atomic, and fails if the name already exists
            except FileExistsError:
                return False
            except OSError as e:
                raise StorageError(f"creating {self.uri_of(key)} failed: {e}") from e
            self._sync_dir(final.parent)
            return True

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        final = self._file(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(final.parent / f".{final.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def compare_and_swap(self, key: str, data: bytes, expected_token: str) -> str:
        with self._locked(key):
            try:
                _, token = self.read_with_token(key)
            except NotFoundError:
                raise ConflictError(
                    f"compare-and-swap on {self.uri_of(key)} failed: it no longer exists; re-read and decide again"
                ) from None
            if token != expected_token:
                raise ConflictError(
                    f"compare-and-swap on {self.uri_of(key)} failed: it changed since it was read "
                    f"(token {expected_token[:12]} expected, {token[:12]} found); re-read and decide again"
                )
            self.write_bytes(key, data)
        return _token(data)

    def delete(self, key: str) -> None:
        try:
            self._file(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"deleting {self.uri_of(key)} failed: {e}") from e

    # -- pyarrow -------------------------------------------------------------------------------
    def filesystem(self) -> pafs.FileSystem:
        return self._fs

    def path(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)
