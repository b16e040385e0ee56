"""The experience log writer: buffered, at-least-once, and loss-free through store outages.

Life of a record:

1. `append` buffers it in memory and, every `chunk_records`, converts the buffer to Arrow in the
   caller's thread (a few ms); the caller never waits for encoding or I/O.
2. A background thread flushes when the buffer holds `flush_bytes` or its oldest record is
   `flush_age_s` old: Parquet files of at most about `flush_bytes` each, never spanning two UTC
   dates, `experience/date=YYYY-MM-DD/part-*.parquet`. They are encoded in memory on
   `encode_threads` threads at once (Parquet encoding releases the GIL, and one `write_table` call
   uses one core) and written with the store's atomic `write_bytes`, so no reader ever sees a
   partial file.
3. A failed write is retried with jittered exponential backoff; if the store stays down the file
   goes to the bounded local `Spool` under its final key and is uploaded later by a probe. While
   the store is known to be down, flushes go straight to the spool instead of stalling.

`flush()` is the acknowledgement: when it returns, every record appended before it is durable, in
the store or in the fsynced spool, and survives a crash of this process. Records appended since the last flush are
not acknowledged and may be lost by a crash; callers resend them with the same `event_id` and
readers drop the duplicates. When memory (`max_buffer_bytes`) is full because nothing can be
written, `append` blocks up to `append_timeout_s` and then raises `StorageError`: backpressure,
never silent loss.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.config import StorageConfig
from storage.errors import NotFoundError, StorageError
from storage.records import RECORD_OVERHEAD_BYTES, ExperienceRecord, conform, records_to_table
from storage.spool import Spool
from storage.uri import Store, as_store

log = logging.getLogger(__name__)

EXPERIENCE_PREFIX = "experience"


@dataclass(frozen=True)
class WriterConfig:
    """How much to buffer, when to flush, how hard to retry, and where to spool.

    spool_dir: local directory for files the store could not take; None means
        `StorageConfig.spool_dir`. It must be on local disk: it is what survives an S3 outage.
    """

    flush_bytes: int = 32 * 2**20
    flush_age_s: float = 30.0
    max_buffer_bytes: int = 256 * 2**20
    append_timeout_s: float = 60.0
    chunk_records: int = 1024
    spool_dir: str | None = None
    max_spool_bytes: int = 2 * 2**30
    retry_attempts: int = 3
    retry_base_delay_s: float = 0.2
    retry_max_delay_s: float = 10.0  # also the longest wait between probes of a down store
    compression: str = "zstd"
    encode_threads: int = 2


@dataclass
class WriterStats:
    """Counters for monitoring and tests."""

    records_committed: int = 0  # in the store or the spool
    files_written: int = 0  # straight to the store
    files_spooled: int = 0
    files_drained: int = 0  # spool -> store
    write_failures: int = 0  # failed store writes, retries included


@dataclass
class _Buffer:
    records: list[ExperienceRecord] = field(default_factory=list)
    chunks: list[pa.Table] = field(default_factory=list)
    nbytes: int = 0
    since: float | None = None  # monotonic time of the oldest unflushed record


def part_key(date: str) -> str:
    """A fresh, time-ordered, collision-free key for one Parquet part of `date` (YYYY-MM-DD)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{EXPERIENCE_PREFIX}/date={date}/part-{stamp}-{uuid.uuid4().hex[:12]}.parquet"


class ExperienceWriter:
    """Appends `ExperienceRecord`s to the log under `store_or_uri`; see the module docstring."""

    def __init__(
        self,
        store_or_uri: Store | str | None = None,
        config: WriterConfig | None = None,
        storage_config: StorageConfig | None = None,
    ) -> None:
        self.config = config or WriterConfig()
        self.store = as_store(store_or_uri, storage_config)
        spool_dir = self.config.spool_dir or (storage_config or StorageConfig.from_env()).spool_dir
        self.spool = Spool(spool_dir, self.store.uri, self.config.max_spool_bytes)
        self.stats = WriterStats()
        self._buffer = _Buffer()
        self._inflight_bytes = 0
        self._lock = threading.Lock()  # taken directly on the hot path: a C-level `with`
        self._cond = threading.Condition(self._lock)
        self._flush_lock = threading.Lock()
        self._closed = False
        self._down_until = 0.0  # monotonic time before which the store is assumed down
        self._down_delay = self.config.retry_base_delay_s
        self._encoders = ThreadPoolExecutor(max(1, self.config.encode_threads), thread_name_prefix="experience-encode")
        self._flusher = threading.Thread(target=self._run_flusher, name="experience-flusher", daemon=True)
        self._flusher.start()

    # -- public API ----------------------------------------------------------------------------
    def append(self, record: ExperienceRecord) -> None:
        """Buffer one record; blocks (then raises StorageError) only if memory is full."""
        with self._lock:  # this method runs once per served turn: kept lean on purpose
            buf = self._buffer
            if self._closed or buf.nbytes + self._inflight_bytes >= self.config.max_buffer_bytes:
                self._wait_for_room()
                buf = self._buffer
            buf.records.append(record)
            buf.nbytes += len(record.prompt) + len(record.response) + RECORD_OVERHEAD_BYTES
            if buf.since is None:  # a new buffer: the flusher must learn its age deadline
                buf.since = time.monotonic()
                self._cond.notify_all()
            if len(buf.records) >= self.config.chunk_records:
                # Converting under the lock costs no parallelism (it holds the GIL anyway) and
                # keeps every appended record in exactly one buffer.
                buf.chunks.append(records_to_table(buf.records))
                buf.records = []
                if buf.nbytes >= self.config.flush_bytes:
                    self._cond.notify_all()

    def append_table(self, table: pa.Table) -> None:
        """Buffer many records at once (bulk import, benchmarks); the table is cast to the schema."""
        table = conform(table)
        with self._cond:
            self._wait_for_room()
            self._buffer.chunks.append(table)
            self._buffer.nbytes += table.nbytes
            self._buffer.since = self._buffer.since or time.monotonic()
            self._cond.notify_all()

    def flush(self) -> int:
        """Commit everything appended so far to the store or the spool; returns the records committed.

        Raises StorageError if neither the store nor the spool could take them (they stay buffered).
        """
        committed = self._flush_buffer()
        self._drain_spool()
        return committed

    def close(self) -> None:
        """Flush, try once more to empty the spool, and stop the flusher. Raises if records remain."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._flusher.join()
        self._mark_up()  # whatever the last probe said, try the store once more before giving up
        try:
            self.flush()
        finally:
            self._encoders.shutdown()
        if self.spool.pending():
            log.warning(
                "closing with %d file(s) still spooled in %s; the next writer on %s with this spool_dir uploads them",
                len(self.spool.pending()),
                self.spool.directory,
                self.store.uri,
            )

    def __enter__(self) -> ExperienceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- buffering -----------------------------------------------------------------------------
    def _wait_for_room(self) -> None:
        """Called with the lock held: backpressure while the store and spool cannot keep up."""
        if self._closed:
            raise StorageError("append on a closed ExperienceWriter; open a new one")
        deadline = time.monotonic() + self.config.append_timeout_s
        while self._buffer.nbytes + self._inflight_bytes >= self.config.max_buffer_bytes:
            self._cond.notify_all()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StorageError(
                    f"experience buffer full ({self.config.max_buffer_bytes} bytes) "
                    f"for {self.config.append_timeout_s}s: "
                    f"{self.store.uri} and the spool {self.spool.directory} are not accepting files; see earlier errors"
                )
            self._cond.wait(remaining)

    def _take_buffer(self) -> tuple[pa.Table | None, int]:
        with self._cond:
            buf, self._buffer = self._buffer, _Buffer()
            self._inflight_bytes += buf.nbytes
        chunks = buf.chunks + ([records_to_table(buf.records)] if buf.records else [])
        table = pa.concat_tables(chunks) if chunks else None
        return table, buf.nbytes

    def _flush_buffer(self) -> int:
        with self._flush_lock:
            table, nbytes = self._take_buffer()
            try:
                if table is None or table.num_rows == 0:
                    return 0
                try:
                    unsent = self._commit(table)
                except BaseException:
                    self._requeue(table)  # an unexpected error must not lose the batch
                    raise
                if unsent is not None:
                    self._requeue(unsent)
                    raise StorageError(
                        f"{unsent.num_rows} experience records could not be written to {self.store.uri} "
                        f"nor spooled in {self.spool.directory}; they stay buffered and will be retried"
                    )
                return table.num_rows
            finally:
                with self._cond:
                    self._inflight_bytes -= nbytes
                    self._cond.notify_all()

    def _requeue(self, table: pa.Table) -> None:
        """Put rows that were not committed back at the front of the buffer."""
        with self._cond:
            self._buffer.chunks.insert(0, table)
            self._buffer.nbytes += table.nbytes
            self._buffer.since = self._buffer.since or time.monotonic()

    def _flush_due(self) -> bool:
        buf = self._buffer
        if buf.nbytes >= self.config.flush_bytes:
            return True
        return buf.since is not None and time.monotonic() - buf.since >= self.config.flush_age_s

    def _run_flusher(self) -> None:
        """Background loop: flush by size or age, and probe the store while files are spooled."""
        while True:
            with self._cond:
                while not self._closed and not self._flush_due() and not self._probe_due():
                    self._cond.wait(self._sleep_time())
                if self._closed:
                    return
                flush_due = self._flush_due()
            try:
                if flush_due:
                    self._flush_buffer()
                self._drain_spool()
            except StorageError as e:
                log.error("background flush failed; records stay buffered and will be retried: %s", e)
                self._pause_after_failure()
            except Exception:  # a bug must not silently stop all flushing
                log.exception("background flush of %s failed; records stay buffered", self.store.uri)
                self._pause_after_failure()

    def _pause_after_failure(self) -> None:
        with self._cond:
            self._cond.wait(max(self.config.retry_base_delay_s, self._down_until - time.monotonic()))

    def _sleep_time(self) -> float:
        waits = [1.0]
        if self._buffer.since is not None:
            waits.append(self._buffer.since + self.config.flush_age_s - time.monotonic())
        if self.spool.nbytes:
            waits.append(self._down_until - time.monotonic())
        return max(0.01, min(waits))

    # -- committing ----------------------------------------------------------------------------
    def _commit(self, table: pa.Table) -> pa.Table | None:
        """Write `table` as files of one UTC date each; returns the rows that neither the store nor the spool took."""
        parts = self._split(table)
        unsent = []
        for (key, part), data in zip(parts, self._encoders.map(self._encode, [p for _, p in parts]), strict=True):
            try:
                self._deliver(key, data)
                self.stats.records_committed += part.num_rows
            except StorageError as e:
                log.error("%s", e)
                unsent.append(part)
        return pa.concat_tables(unsent) if unsent else None

    def _split(self, table: pa.Table) -> list[tuple[str, pa.Table]]:
        """(key, rows) pieces: one date each, at most about `flush_bytes` each (zero-copy slices)."""
        dates = pc.cast(table["ts"], pa.date32())
        unique = pc.unique(dates).to_pylist()
        pieces = []
        for date in sorted(unique):
            part = table if len(unique) == 1 else table.filter(pc.equal(dates, pa.scalar(date, pa.date32())))
            count = max(1, -(-part.nbytes // self.config.flush_bytes))
            rows = -(-part.num_rows // count)
            pieces += [(part_key(date.isoformat()), part.slice(start, rows)) for start in range(0, part.num_rows, rows)]
        return pieces

    def _encode(self, table: pa.Table) -> memoryview:
        """Parquet bytes in memory, through an Arrow sink (a Python file object would take the GIL per write)."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression=self.config.compression)
        return memoryview(sink.getvalue())

    def _deliver(self, key: str, data: memoryview) -> None:
        """Store `data` at `key`, or spool it if the store keeps failing; StorageError if neither."""
        if self._store_up() and self._write_with_retries(key, data):
            self.stats.files_written += 1
            return
        self.spool.put(key, data)
        self.stats.files_spooled += 1
        log.warning("spooled %s (%d bytes) for %s", key, len(data), self.store.uri)

    def _write_with_retries(self, key: str, data: memoryview) -> bool:
        cfg = self.config
        for attempt in range(cfg.retry_attempts):
            try:
                self.store.write_bytes(key, data)
                self._mark_up()
                return True
            except StorageError as e:
                self.stats.write_failures += 1
                log.warning("write %d/%d of %s failed: %s", attempt + 1, cfg.retry_attempts, key, e)
                if attempt + 1 < cfg.retry_attempts:
                    time.sleep(self._backoff(attempt))
        self._mark_down()
        return False

    def _backoff(self, attempt: int) -> float:
        cfg = self.config
        return min(cfg.retry_max_delay_s, cfg.retry_base_delay_s * 2**attempt) * random.uniform(0.5, 1.0)

    # -- store health and the spool ------------------------------------------------------------
    def _store_up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _probe_due(self) -> bool:
        return self.spool.nbytes > 0 and self._store_up()

    def _mark_down(self) -> None:
        self._down_until = time.monotonic() + self._down_delay
        self._down_delay = min(self.config.retry_max_delay_s, self._down_delay * 2)

    def _mark_up(self) -> None:
        self._down_until = 0.0
        self._down_delay = self.config.retry_base_delay_s

    def _drain_spool(self) -> None:
        """Upload spooled files under their original keys (so a repeat is harmless), oldest first."""
        if not self._store_up():
            return
        with self._flush_lock:
            for key in self.spool.pending():
                try:
                    data = self.spool.read(key)
                except NotFoundError:
                    continue  # another writer sharing this spool uploaded it
                try:
                    self.store.write_bytes(key, data)
                except StorageError as e:
                    self.stats.write_failures += 1
                    self._mark_down()
                    log.warning("store still unreachable, %s stays spooled: %s", key, e)
                    return
                self._mark_up()
                self.spool.remove(key)
                self.stats.files_drained += 1
                log.info("uploaded spooled %s to %s", key, self.store.uri)
