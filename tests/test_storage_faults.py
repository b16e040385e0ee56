"""Fault tests for the experience log: an S3 outage, a writer killed mid-flush, a corrupt file.

Run as a script, this file is the writer process that the kill test starts and SIGKILLs:
    python test_storage_faults.py ROOT_URI ENDPOINT SPOOL_DIR FIRST TOTAL BATCH
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage.config import StorageConfig
from storage.errors import CorruptDataError, StorageError
from storage.experience import ExperienceReader, ExperienceRecord, ExperienceWriter, WriterConfig
from storage.uri import Store

START = datetime(2025, 6, 1, 23, 59, tzinfo=UTC)


def numbered_record(i: int, payload: int = 64) -> ExperienceRecord:
    """Record i, identical every time it is made (same event_id), as a resending client would."""
    rng = random.Random(i)
    return ExperienceRecord(
        user_id=f"user-{i % 7}",
        session_id=f"s-{i % 11}",
        prompt=rng.randbytes(payload),
        response=rng.randbytes(payload),
        model_version="v0001",
        surprise=float(i),
        event_id=f"evt-{i:07d}",
        ts=START + timedelta(milliseconds=20 * i),  # crosses midnight: flushes span two partitions
    )


def event_ids(table) -> list[str]:
    return table["event_id"].to_pylist()


# -- (a) the store goes away for several seconds mid-stream ---------------------------------------
def test_s3_outage_mid_stream_loses_and_duplicates_nothing(outage_s3, outage_store: Store, tmp_path) -> None:
    store = outage_store
    config = WriterConfig(
        spool_dir=str(tmp_path / "spool"),
        flush_bytes=8_000,
        flush_age_s=0.1,
        retry_attempts=2,
        retry_base_delay_s=0.05,
        retry_max_delay_s=0.5,
    )
    writer = ExperienceWriter(store, config)

    def stream(first: int, count: int, seconds: float) -> None:
        for i in range(first, first + count):
            writer.append(numbered_record(i))
            time.sleep(seconds / count)

    stream(0, 150, 1.0)
    writer.flush()
    assert writer.stats.files_written > 0 and writer.stats.files_spooled == 0

    outage_s3.stop()
    try:
        with pytest.raises(StorageError, match="reachable"):
            store.exists("probe")  # the outage is real: the client's connections fail
        stream(150, 150, 3.0)
        writer.flush()  # acknowledged during the outage: it went to the spool
        assert writer.stats.files_spooled > 0
    finally:
        outage_s3.start()

    stream(300, 150, 1.0)
    writer.close()
    assert writer.spool.pending() == [], "spooled files were not uploaded after the store came back"
    assert writer.stats.files_drained > 0
    assert event_ids(ExperienceReader(store).read(strict=True)) == [f"evt-{i:07d}" for i in range(450)]


# -- (b) the writer process is SIGKILLed mid-flush, then restarted --------------------------------
def _writer_process(root: str, endpoint: str, spool: str, first: int, total: int, batch: int) -> None:
    """Append records first..total-1, flushing every `batch`; prints FLUSH before and ACK after."""
    config = StorageConfig(root=root, s3_endpoint_url=endpoint or None, spool_dir=spool)
    # No size/age flushes: only the explicit flush() acknowledges, so ACK lines are exact.
    writer_config = WriterConfig(spool_dir=spool, flush_bytes=2**40, flush_age_s=3600, max_buffer_bytes=2**40)
    writer = ExperienceWriter(root, writer_config, config)
    for i in range(first, total):
        writer.append(numbered_record(i, payload=2048))
        if (i + 1) % batch == 0 or i + 1 == total:
            print(f"FLUSH {i}", flush=True)
            writer.flush()
            print(f"ACK {i}", flush=True)
    writer.close()
    print("DONE", flush=True)


def _start_writer(store: Store, endpoint: str, spool: Path, first: int, total: int, batch: int) -> subprocess.Popen:
    args = [store.uri, endpoint, str(spool), str(first), str(total), str(batch)]
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=os.environ.copy())


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_writer_killed_mid_flush_loses_nothing_acknowledged_and_leaves_no_partial_file(
    backend: str, request, tmp_path
) -> None:
    store: Store = request.getfixturevalue(f"{backend}_store")
    endpoint = store.config.s3_endpoint_url if backend == "s3" else ""
    total, batch, spool = 12_000, 1_500, tmp_path / "writer-spool"
    rng = random.Random(0)
    acked, kills_mid_flush = -1, 0

    for _ in range(3):
        process = _start_writer(store, endpoint, spool, acked + 1, total, batch)
        flushes = 0
        for line in process.stdout:
            kind, index = line.split()
            if kind == "ACK":
                acked = int(index)
            elif kind == "FLUSH":
                flushes += 1
                if flushes == 2:  # one flush acknowledged in this life, the next one in progress
                    time.sleep(rng.uniform(0.0, 0.03))
                    process.send_signal(signal.SIGKILL)
                    break
        rest = process.stdout.read().split()
        process.wait()
        assert process.returncode == -signal.SIGKILL
        if "ACK" in rest:
            acked = int(rest[rest.index("ACK") + 1])
        else:
            kills_mid_flush += 1

        # Nothing acknowledged is lost, nothing partial is visible, nothing appears twice.
        table = ExperienceReader(store).read(strict=True)
        assert set(event_ids(table)) >= {f"evt-{i:07d}" for i in range(acked + 1)}
        assert len(set(event_ids(table))) == table.num_rows
        for key in store.list("experience/"):
            pq.read_metadata(store.path(key), filesystem=store.filesystem())

    assert kills_mid_flush > 0, "no kill landed inside a flush; the test did not test what it claims"
    process = _start_writer(store, endpoint, spool, acked + 1, total, batch)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and out.split()[-1] == "DONE"
    assert event_ids(ExperienceReader(store).read(strict=True)) == [f"evt-{i:07d}" for i in range(total)]


# -- (c) a corrupt file in the log ----------------------------------------------------------------
@pytest.fixture
def log_with_corrupt_files(store: Store, tmp_path) -> tuple[Store, list[str]]:
    with ExperienceWriter(store, WriterConfig(spool_dir=str(tmp_path / "spool"))) as writer:
        for i in range(100):
            writer.append(numbered_record(i))
    good = store.list("experience/")[0]
    bad = [
        "experience/date=2025-06-01/part-garbage.parquet",
        "experience/date=2025-06-02/part-truncated.parquet",
    ]
    store.write_bytes(bad[0], b"this is not parquet at all")
    store.write_bytes(bad[1], store.read_bytes(good)[:-100])
    return store, bad


def test_reader_skips_a_corrupt_file_with_a_warning_naming_it(log_with_corrupt_files, caplog) -> None:
    store, bad = log_with_corrupt_files
    reader = ExperienceReader(store)
    with caplog.at_level(logging.WARNING, logger="storage.experience_reader"):
        table = reader.read()
    assert event_ids(table) == [f"evt-{i:07d}" for i in range(100)]
    assert reader.skipped == bad
    for key in bad:
        assert any(store.uri_of(key) in message for message in caplog.messages), key


def test_strict_reader_raises_on_a_corrupt_file(log_with_corrupt_files) -> None:
    store, bad = log_with_corrupt_files
    with pytest.raises(CorruptDataError, match="part-garbage.parquet"):
        ExperienceReader(store).read(strict=True)


if __name__ == "__main__":
    root, endpoint, spool, first, total, batch = sys.argv[1:7]
    _writer_process(root, endpoint, spool, int(first), int(total), int(batch))
