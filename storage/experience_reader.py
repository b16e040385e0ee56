"""The experience log reader: date range and user scans, duplicates dropped, replay sampling.

Files are chosen by their Hive partition (`date=YYYY-MM-DD`) from one listing of the store, then
scanned together with pyarrow.dataset (parallel, with the user filter pushed down). If that scan
fails, each file is read on its own to find the culprit: a file whose bytes can be fetched but do
not parse is corrupt and is skipped with a warning that names it (or raises `CorruptDataError` in
strict mode); a file that cannot be fetched is a storage problem and raises `StorageError`, since
skipping it would silently drop good data.

Writers are at-least-once, so the same `event_id` may appear in several files; the reader keeps
the first occurrence. Rows come back sorted by (`ts`, `event_id`), which makes `sample` with a
fixed seed reproducible.
"""

from __future__ import annotations

import logging
import re
from datetime import date, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from storage.config import StorageConfig
from storage.errors import CorruptDataError
from storage.experience_writer import EXPERIENCE_PREFIX
from storage.records import EXPERIENCE_SCHEMA, ExperienceRecord, conform, table_to_records
from storage.uri import Store, as_store

log = logging.getLogger(__name__)

_MAX_LISTED_DAYS = 62  # longer ranges list the whole log once instead of one prefix per day
_PART = re.compile(rf"^{EXPERIENCE_PREFIX}/date=(\d{{4}}-\d{{2}}-\d{{2}})/[^/]+\.parquet$")


def drop_duplicate_events(table: pa.Table) -> pa.Table:
    """Keep the first row of every `event_id`."""
    if table.num_rows == 0:
        return table
    indexed = table.select(["event_id"]).append_column("_row", pa.array(np.arange(table.num_rows)))
    first = indexed.group_by("event_id", use_threads=False).aggregate([("_row", "min")])["_row_min"]
    return table.take(np.sort(first.to_numpy()))


class ExperienceReader:
    """Reads the log under `store_or_uri`; see the module docstring."""

    def __init__(self, store_or_uri: Store | str | None = None, storage_config: StorageConfig | None = None) -> None:
        self.store = as_store(store_or_uri, storage_config)
        self.skipped: list[str] = []  # corrupt files skipped by the last read

    def files(self, start: date | None = None, end: date | None = None) -> list[str]:
        """Keys of the Parquet parts whose partition date lies in [start, end] (inclusive)."""
        lo, hi = (start.isoformat() if start else ""), (end.isoformat() if end else "9999-12-31")
        if start and end and 0 <= (end - start).days < _MAX_LISTED_DAYS:
            # A bounded range lists only its own partitions: a night reads one day of a long log.
            days = (start + timedelta(days=i) for i in range((end - start).days + 1))
            prefixes = [f"{EXPERIENCE_PREFIX}/date={day.isoformat()}/" for day in days]
        else:
            prefixes = [EXPERIENCE_PREFIX + "/"]
        keys = []
        for prefix in prefixes:
            for key in self.store.list(prefix):
                match = _PART.match(key)
                if match and lo <= match.group(1) <= hi:
                    keys.append(key)
        return keys

    def read(
        self,
        start: date | None = None,
        end: date | None = None,
        user_id: str | None = None,
        strict: bool = False,
        *,
        shareable_only: bool = False,
    ) -> pa.Table:
        """Deduplicated records from [start, end] (UTC dates, inclusive), optionally of one user.

        `shareable_only` keeps only records their users allowed into shared weights.
        """
        keys = self.files(start, end)
        self.skipped = []
        condition = _condition(user_id, shareable_only)
        if not keys:
            return EXPERIENCE_SCHEMA.empty_table()
        try:
            table = self._scan(keys, condition)
        except (pa.ArrowException, OSError) as e:
            log.info("scan of %d experience files failed (%s); reading them one by one", len(keys), e)
            table = self._read_each(keys, condition, strict)
        table = drop_duplicate_events(table)
        return table.sort_by([("ts", "ascending"), ("event_id", "ascending")])

    def records(
        self,
        start: date | None = None,
        end: date | None = None,
        user_id: str | None = None,
        strict: bool = False,
        *,
        shareable_only: bool = False,
    ) -> list[ExperienceRecord]:
        return table_to_records(self.read(start, end, user_id, strict, shareable_only=shareable_only))

    def sample(
        self,
        n: int,
        seed: int = 0,
        start: date | None = None,
        end: date | None = None,
        user_id: str | None = None,
        *,
        shareable_only: bool = False,
        strict: bool = False,
    ) -> pa.Table:
        """Up to `n` distinct records drawn uniformly without replacement (replay / rehearsal)."""
        table = self.read(start, end, user_id, strict, shareable_only=shareable_only)
        if n >= table.num_rows:
            return table
        picks = np.random.default_rng(seed).choice(table.num_rows, size=n, replace=False)
        return table.take(np.sort(picks))

    def _scan(self, keys: list[str], condition: pc.Expression | None) -> pa.Table:
        paths = [self.store.path(k) for k in keys]
        dataset = ds.dataset(paths, schema=EXPERIENCE_SCHEMA, format="parquet", filesystem=self.store.filesystem())
        return dataset.to_table(filter=condition)

    def _read_each(self, keys: list[str], condition: pc.Expression | None, strict: bool) -> pa.Table:
        tables = []
        for key in keys:
            data = self.store.read_bytes(key)  # StorageError propagates: unreachable is not corrupt
            try:
                table = conform(pq.read_table(pa.BufferReader(data)))
            except (pa.ArrowException, OSError, KeyError) as e:
                message = f"corrupt experience file {self.store.uri_of(key)}: {e}"
                if strict:
                    raise CorruptDataError(f"{message}; move it aside or delete it, then read again") from e
                log.warning("skipping %s", message)
                self.skipped.append(key)
                continue
            tables.append(table.filter(condition) if condition is not None else table)
        return pa.concat_tables(tables) if tables else EXPERIENCE_SCHEMA.empty_table()


def _condition(user_id: str | None, shareable_only: bool) -> pc.Expression | None:
    terms = []
    if user_id is not None:
        terms.append(pc.field("user_id") == user_id)
    if shareable_only:
        terms.append(pc.field("shareable"))
    if not terms:
        return None
    condition = terms[0]
    for term in terms[1:]:
        condition = condition & term
    return condition
