"""The experience log: writer, reader and file layout, on file:// and S3 alike."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from storage.errors import StorageError
from storage.experience import (
    EXPERIENCE_SCHEMA,
    ExperienceReader,
    ExperienceRecord,
    ExperienceWriter,
    WriterConfig,
    records_to_table,
)
from storage.uri import Store

DAY = datetime(2025, 3, 1, 12, tzinfo=UTC)


def make_record(i: int, *, day: int = 0, user: str | None = None, shareable: bool = False) -> ExperienceRecord:
    return ExperienceRecord(
        user_id=user or f"user-{i % 3}",
        session_id=f"s-{i % 5}",
        prompt=f"prompt {i}".encode() + bytes([i % 256]),
        response=f"response {i}".encode(),
        model_version="v0001",
        surprise=i / 10,
        feedback=None if i % 2 else 1.0,
        shareable=shareable,
        event_id=f"evt-{i:06d}",
        ts=DAY + timedelta(days=day, seconds=i),
    )


def writer_config(tmp_path: Path, **overrides) -> WriterConfig:
    return WriterConfig(spool_dir=str(tmp_path / "spool"), **overrides)


def test_appended_records_read_back_field_for_field(store: Store, tmp_path) -> None:
    records = [make_record(i) for i in range(50)]
    with ExperienceWriter(store, writer_config(tmp_path)) as writer:
        for record in records:
            writer.append(record)
    assert ExperienceReader(store).records() == records


def test_files_are_hive_partitioned_by_utc_date(store: Store, tmp_path) -> None:
    with ExperienceWriter(store, writer_config(tmp_path)) as writer:
        for i in range(6):
            writer.append(make_record(i, day=i % 3))
    dates = sorted({key.split("/")[1] for key in store.list("experience/")})
    assert dates == ["date=2025-03-01", "date=2025-03-02", "date=2025-03-03"]


def test_log_directory_is_readable_as_is_by_pyarrow_dataset(store: Store, tmp_path) -> None:
    with ExperienceWriter(store, writer_config(tmp_path)) as writer:
        for i in range(10):
            writer.append(make_record(i, day=i % 2))
    dataset = ds.dataset(store.path("experience"), filesystem=store.filesystem(), partitioning="hive")
    table = dataset.to_table()
    assert table.num_rows == 10
    assert set(EXPERIENCE_SCHEMA.names) | {"date"} == set(table.column_names)
    for key in store.list("experience/"):  # every file alone has exactly the schema
        assert pq.read_schema(store.path(key), filesystem=store.filesystem()).equals(EXPERIENCE_SCHEMA)


def test_reader_drops_duplicate_event_ids(store: Store, tmp_path) -> None:
    with ExperienceWriter(store, writer_config(tmp_path)) as writer:
        for i in range(20):
            writer.append(make_record(i))
        writer.flush()
        for i in range(10, 30):  # a resend after a crash: same event ids, new file
            writer.append(make_record(i))
    table = ExperienceReader(store).read()
    assert table["event_id"].to_pylist() == [f"evt-{i:06d}" for i in range(30)]


def test_reader_scans_a_date_range_and_one_user(store: Store, tmp_path) -> None:
    with ExperienceWriter(store, writer_config(tmp_path)) as writer:
        for i in range(30):
            writer.append(make_record(i, day=i % 3))
    reader = ExperienceReader(store)
    assert reader.read(date(2025, 3, 2), date(2025, 3, 3)).num_rows == 20
    assert reader.read(start=date(2025, 3, 3)).num_rows == 10
    assert reader.read(end=date(2025, 3, 1)).num_rows == 10
    only = reader.read(date(2025, 3, 1), date(2025, 3, 2), user_id="user-1")
    assert set(only["user_id"].to_pylist()) == {"user-1"}
    assert only.num_rows == len([i for i in range(30) if i % 3 < 2 and i % 3 == 1])


def test_shareable_only_keeps_what_users_allowed_into_shared_weights(store: Store, tmp_path) -> None:
    with ExperienceWriter(store, writer_config(tmp_path)) as writer:
        for i in range(10):
            writer.append(make_record(i, shareable=i < 4))
    table = ExperienceReader(store).read(shareable_only=True)
    assert table["event_id"].to_pylist() == [f"evt-{i:06d}" for i in range(4)]


def test_sample_is_distinct_reproducible_and_bounded(local_store: Store, tmp_path) -> None:
    with ExperienceWriter(local_store, writer_config(tmp_path)) as writer:
        for i in range(100):
            writer.append(make_record(i))
    reader = ExperienceReader(local_store)
    first = reader.sample(10, seed=7)["event_id"].to_pylist()
    assert first == reader.sample(10, seed=7)["event_id"].to_pylist()
    assert len(set(first)) == 10
    assert first != reader.sample(10, seed=8)["event_id"].to_pylist()
    assert reader.sample(1000, seed=0).num_rows == 100


def test_empty_log_reads_as_an_empty_table_with_the_schema(store: Store) -> None:
    table = ExperienceReader(store).read()
    assert table.num_rows == 0 and table.schema.equals(EXPERIENCE_SCHEMA)


def test_writer_flushes_by_age_without_being_asked(store: Store, tmp_path) -> None:
    writer = ExperienceWriter(store, writer_config(tmp_path, flush_age_s=0.2))
    writer.append(make_record(1))
    deadline = time.monotonic() + 30  # returns as soon as the file lands; the margin is for a loaded machine
    while not store.list("experience/") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ExperienceReader(store).read().num_rows == 1
    writer.close()


def test_writer_flushes_by_size_without_being_asked(local_store: Store, tmp_path) -> None:
    writer = ExperienceWriter(local_store, writer_config(tmp_path, flush_bytes=20_000, chunk_records=16))
    for i in range(200):  # ~200 * 150 bytes of accounted size
        writer.append(make_record(i))
    deadline = time.monotonic() + 30
    while not local_store.list("experience/") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert local_store.list("experience/"), "no file was flushed once the buffer passed flush_bytes"
    writer.close()
    assert ExperienceReader(local_store).read().num_rows == 200


def test_append_table_writes_the_same_rows_as_append(local_store: Store, tmp_path) -> None:
    records = [make_record(i) for i in range(10)]
    with ExperienceWriter(local_store, writer_config(tmp_path)) as writer:
        writer.append_table(records_to_table(records))
    assert ExperienceReader(local_store).records() == records


def test_records_must_carry_bytes_and_aware_timestamps() -> None:
    with pytest.raises(TypeError, match="bytes"):
        ExperienceRecord("u", "s", "text", b"r", "v1", 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timezone"):
        ExperienceRecord("u", "s", b"p", b"r", "v1", 0.0, ts=datetime(2025, 1, 1))


def test_full_spool_applies_backpressure_instead_of_dropping(outage_s3, outage_store: Store, tmp_path) -> None:
    """Store down and spool full: flush raises, append blocks then raises, and nothing is lost."""
    store = outage_store
    config = writer_config(
        tmp_path,
        max_spool_bytes=1,
        max_buffer_bytes=20_000,
        append_timeout_s=0.3,
        retry_attempts=1,
        retry_max_delay_s=0.2,
    )
    writer = ExperienceWriter(store, config)
    outage_s3.stop()
    try:
        writer.append(make_record(0))
        with pytest.raises(StorageError, match="spool"):
            writer.flush()
        with pytest.raises(StorageError, match="buffer full"):
            for i in range(1, 1000):
                writer.append(make_record(i))
    finally:
        outage_s3.start()
    accepted = i  # records 0 .. i-1 were accepted before append refused record i
    time.sleep(0.3)  # let the writer's next probe of the store come due
    writer.close()
    assert ExperienceReader(store).read().num_rows == accepted


def test_next_writer_uploads_what_a_crashed_writer_left_spooled(store: Store, tmp_path) -> None:
    from storage.experience_writer import part_key
    from storage.spool import Spool

    sink = pa.BufferOutputStream()
    pq.write_table(records_to_table([make_record(i) for i in range(5)]), sink)
    key = part_key("2025-03-01")
    Spool(tmp_path / "spool", store.uri, max_bytes=2**20).put(key, sink.getvalue().to_pybytes())

    writer = ExperienceWriter(store, writer_config(tmp_path))
    writer.close()
    assert writer.spool.pending() == [] and store.list("experience/") == [key]
    assert ExperienceReader(store).read().num_rows == 5
