"""The experience record: one served turn, as a dataclass and as an Arrow row.

`EXPERIENCE_SCHEMA` is the contract with every reader (pyarrow.dataset, pandas, the sleep flow).
Files carry no `date` column: the date is the Hive partition (`date=YYYY-MM-DD`, the UTC date of
`ts`), which pyarrow.dataset and pandas add back when they read the directory with hive
partitioning.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from operator import attrgetter

import numpy as np
import pyarrow as pa

EXPERIENCE_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),  # unique; readers drop duplicates by it
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("session_id", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),  # slow weights that served the turn
        pa.field("prompt", pa.binary(), nullable=False),  # raw bytes: the model is byte-level
        pa.field("response", pa.binary(), nullable=False),
        pa.field("surprise", pa.float64(), nullable=False),  # mean bits/byte of the prompt under the model
        pa.field("feedback", pa.float64(), nullable=True),  # user signal, if any
        pa.field("shareable", pa.bool_(), nullable=False),  # may feed shared weights (privacy gate)
    ],
    metadata={"reverie.schema": "experience/1"},
)
COLUMNS = EXPERIENCE_SCHEMA.names
RECORD_OVERHEAD_BYTES = 128  # in-memory size of a record beyond its prompt and response, roughly


def _new_event_id() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class ExperienceRecord:
    """One turn. `event_id` makes appends idempotent: resend a record after a crash, never copy it."""

    user_id: str
    session_id: str
    prompt: bytes
    response: bytes
    model_version: str
    surprise: float
    feedback: float | None = None
    shareable: bool = False
    event_id: str = field(default_factory=_new_event_id)
    ts: datetime = field(default_factory=_now)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, bytes) or not isinstance(self.response, bytes):
            raise TypeError("prompt and response must be bytes; encode text with .encode('utf-8')")
        if self.ts.tzinfo is None:
            raise ValueError("ts must be timezone-aware; use datetime.now(datetime.UTC)")


_FIELD_NAMES = [f.name for f in fields(ExperienceRecord)]
assert sorted(_FIELD_NAMES) == sorted(COLUMNS), "ExperienceRecord and EXPERIENCE_SCHEMA disagree"


def _binary_array(values: list[bytes]) -> pa.Array:
    """A binary array built from one joined buffer: ~3x faster than pa.array for KB-sized payloads."""
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:  # int32 offsets would overflow; let pyarrow chunk it
        return pa.chunked_array([pa.array(values, type=pa.binary())]).combine_chunks()
    buffers = [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(values))]
    return pa.Array.from_buffers(pa.binary(), len(values), buffers)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _timestamp_array(values: list[datetime]) -> pa.Array:
    """Exact microseconds since the epoch (aware datetimes of any zone), viewed as UTC timestamps.
    60K records: 18 ms, against 72 ms through naive datetimes (the way before) and 22 ms for
    `pa.array` of the aware datetimes."""
    micros = np.fromiter(((v - _EPOCH) // _MICROSECOND for v in values), dtype=np.int64, count=len(values))
    return pa.array(micros, type=pa.int64()).view(EXPERIENCE_SCHEMA.field("ts").type)


def records_to_table(records: Sequence[ExperienceRecord]) -> pa.Table:
    """Column-wise conversion (one Python list per column), the fast way to build Arrow from objects."""
    columns = []
    for f in EXPERIENCE_SCHEMA:
        values = list(map(attrgetter(f.name), records))
        if f.type == pa.binary():
            columns.append(_binary_array(values))
        elif f.name == "ts":
            columns.append(_timestamp_array(values))
        else:
            columns.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(columns, schema=EXPERIENCE_SCHEMA)


def conform(table: pa.Table) -> pa.Table:
    """`table` with exactly the schema's columns, in order and types; raises if it cannot be cast."""
    return table.select(COLUMNS).cast(EXPERIENCE_SCHEMA)


def table_to_records(table: pa.Table) -> list[ExperienceRecord]:
    return [ExperienceRecord(**row) for row in conform(table).to_pylist()]
