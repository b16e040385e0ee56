"""Reverie: storage.

Everything the system persists, on local disk (`file://`, the default) or S3 (`s3://`), through
one `Store` interface (`storage.uri`):

- `storage.experience`: the experience log (Hive-partitioned Parquet), writer and reader.
- `storage.checkpoints`: slow-weight versions and the atomically promoted `current` pointer.
- `storage.fast_states`: one fast-state blob per user.
- `storage.deltas`: per-user and aggregated weight deltas, keyed by base version.
- `storage.episodic_index`: FAISS episodic keys and metadata.

Only pyarrow, boto3, safetensors, numpy, faiss and torch tensors are used; nothing is pickled.
Import the submodule you need: this package's top level stays light (no torch or faiss import).
"""

from storage.config import StorageConfig
from storage.errors import ConflictError, CorruptDataError, NotFoundError, StorageError
from storage.uri import Store, as_store, open_store

__all__ = [
    "ConflictError",
    "CorruptDataError",
    "NotFoundError",
    "StorageConfig",
    "StorageError",
    "Store",
    "as_store",
    "open_store",
]
