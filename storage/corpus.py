"""Read a text corpus from a file, a directory, a Parquet file or an s3:// location.

Returns documents as bytes, for `model.corpus.Corpus.split`. Parquet files contribute every
string or binary column of every row; other files are read whole as bytes.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.config import StorageConfig, to_uri
from storage.uri import open_store

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".csv", ".html", ".xml", ".parquet")


def _documents_of(fs: pafs.FileSystem, path: str) -> list[bytes]:
    if path.endswith(".parquet"):
        table = pq.read_table(path, filesystem=fs)
        documents = []
        for column in table.columns:
            if pa.types.is_string(column.type) or pa.types.is_binary(column.type) or \
                    pa.types.is_large_string(column.type) or pa.types.is_large_binary(column.type):
                documents.extend(v if isinstance(v, bytes) else v.encode("utf-8")
                                 for v in column.to_pylist() if v)
        return documents
    with fs.open_input_stream(path) as stream:
        return [stream.read()]


def read_documents(location: str, config: StorageConfig | None = None) -> list[bytes]:
    """All documents under `location` (a path or URI), in sorted path order."""
    uri = to_uri(location)
    parent, name = posixpath.split(uri.rstrip("/"))
    store = open_store(parent, config)
    fs, path = store.filesystem(), store.path(name)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no corpus at {location}: give a text file, a directory or a Parquet file")
    if info.type == pafs.FileType.File:
        paths = [path]
    else:
        selector = pafs.FileSelector(path, recursive=True)
        paths = sorted(i.path for i in fs.get_file_info(selector)
                       if i.type == pafs.FileType.File and i.path.endswith(TEXT_SUFFIXES))
    documents = [d for p in paths for d in _documents_of(fs, p) if d]
    if not documents:
        raise ValueError(f"corpus {location} holds no text (looked for {', '.join(TEXT_SUFFIXES)})")
    return documents
