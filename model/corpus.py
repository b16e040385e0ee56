"""The embedded training corpus and byte batching.

Nothing is downloaded: the default corpus is the Python installation's own documentation
(pydoc topics and the docstrings of a fixed list of standard-library modules), so every machine
builds the same bytes. Other sources (files, Parquet, s3://) are read by `storage.corpus` and
arrive here as plain bytes.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass

import torch

STDLIB_MODULES = (
    "abc", "argparse", "array", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools",
    "glob", "hashlib", "heapq", "html", "http.client", "inspect", "io", "itertools", "json", "logging",
    "math", "operator", "os", "pathlib", "pickle", "queue", "random", "re", "shutil", "socket",
    "sqlite3", "statistics", "string", "struct", "subprocess", "tempfile", "textwrap", "threading",
    "time", "typing", "unittest", "urllib.parse", "uuid", "weakref", "zipfile",
)


def _docstrings(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    docs = [inspect.getdoc(module) or ""]
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(member) or inspect.isfunction(member):
            doc = inspect.getdoc(member)
            if doc:
                docs.append(f"{module_name}.{name}\n{doc}")
    return [d for d in docs if d]


def embedded_documents() -> list[str]:
    """Documents in a fixed order: pydoc topics, then stdlib docstrings."""
    from pydoc_data.topics import topics  # noqa: PLC0415 - part of the standard library

    documents = [topics[key] for key in sorted(topics)]
    with warnings.catch_warnings():  # some modules warn about deprecated members as we read them
        warnings.simplefilter("ignore", DeprecationWarning)
        for module_name in STDLIB_MODULES:
            documents.extend(_docstrings(module_name))
    return documents


@dataclass(frozen=True)
class Corpus:
    train: bytes
    heldout: bytes

    @classmethod
    def split(cls, documents: list[str] | list[bytes], heldout_every: int = 20) -> "Corpus":
        """Every `heldout_every`-th document goes to the held-out set: both halves cover all topics."""
        encoded = [d.encode("utf-8") if isinstance(d, str) else d for d in documents]
        if not any(encoded):
            raise ValueError("the corpus is empty: give at least one non-empty document")
        train = b"\n\n".join(d for i, d in enumerate(encoded) if i % heldout_every != heldout_every - 1)
        heldout = b"\n\n".join(d for i, d in enumerate(encoded) if i % heldout_every == heldout_every - 1)
        if not heldout:  # too few documents: hold out the tail instead
            cut = int(len(train) * 0.95)
            train, heldout = train[:cut], train[cut:]
        return cls(train=train, heldout=heldout)


def embedded_corpus() -> Corpus:
    return Corpus.split(embedded_documents())


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def random_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops: inputs (b, T) and next-byte targets (b, T)."""
    if data.numel() < seq_len + 1:
        raise ValueError(f"corpus has {data.numel()} bytes, fewer than seq_len+1={seq_len + 1}")
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
    window = starts[:, None] + torch.arange(seq_len + 1)
    chunk = data[window]
    return chunk[:, :-1], chunk[:, 1:]


def sequential_batches(data: torch.Tensor, batch_size: int, seq_len: int, max_batches: int | None = None):
    """Non-overlapping crops in order, for a deterministic held-out evaluation."""
    count = (data.numel() - 1) // seq_len
    starts = torch.arange(count) * seq_len
    for i, first in enumerate(range(0, count, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        window = starts[first:first + batch_size, None] + torch.arange(seq_len + 1)
        chunk = data[window]
        yield chunk[:, :-1], chunk[:, 1:]
