"""Experience-log write throughput: our ExperienceWriter against raw `pyarrow.parquet.write_table`.

Both sides write the same rows with the same compression in the same run; MB/s is the Arrow
in-memory size of the table divided by wall time. The writer starts from `ExperienceRecord`
objects (what serving hands it) and its time includes converting them to Arrow, partitioning,
encoding, atomic commits and the final flush in `close()`; the raw baseline is handed the finished
table. S3 runs against a moto server that this script starts on 127.0.0.1.

    python bench/log_throughput.py [--rows 60000] [--repeats 3]

Writes bench/results/log_throughput.json and prints a table. Goal (ANCHORS.md): local ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq

from storage.config import StorageConfig
from storage.experience import ExperienceRecord, ExperienceWriter, WriterConfig, records_to_table
from storage.uri import Store, open_store

RESULTS = Path(__file__).parent / "results" / "log_throughput.json"
REGION = "us-east-1"


def make_records(n: int, seed: int = 0) -> list[ExperienceRecord]:
    """Chat-like turns: word-salad text prompts (~600 B) and responses (~1.2 KB), 50 users, one day."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]

    def text(size: int) -> bytes:
        return b" ".join(rng.choices(words, k=size // 6))

    start = datetime(2025, 6, 1, tzinfo=UTC)
    return [
        ExperienceRecord(
            user_id=f"user-{i % 50}",
            session_id=f"session-{i % 400}",
            prompt=text(600),
            response=text(1200),
            model_version="v0001",
            surprise=rng.random() * 4,
            feedback=None if i % 3 else 1.0,
            shareable=i % 2 == 0,
            event_id=uuid.UUID(int=rng.getrandbits(128)).hex,
            ts=start + timedelta(seconds=i),
        )
        for i in range(n)
    ]


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    records: list[ExperienceRecord], table: pa.Table, store: Store, spool: Path, repeats: int, compression: str
) -> dict:
    """Median MB/s of raw write_table and of the writer (fed records, and fed the table), interleaved."""
    fs = store.filesystem()
    config = WriterConfig(spool_dir=str(spool), compression=compression)

    def run_raw() -> None:
        path = store.path(f"raw/{uuid.uuid4().hex}.parquet")
        fs.create_dir(path.rsplit("/", 1)[0])
        pq.write_table(table, path, filesystem=fs, compression=compression)

    def run_writer_records() -> None:
        with ExperienceWriter(store, config) as writer:
            for record in records:
                writer.append(record)

    def run_writer_table() -> None:
        with ExperienceWriter(store, config) as writer:
            writer.append_table(table)

    runs = {"raw": run_raw, "writer_records": run_writer_records, "writer_table": run_writer_table}
    for run in runs.values():
        run()  # warm up: imports, connections, page cache
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name].append(timed(run))
    mb = table.nbytes / 1e6
    mb_s = {name: mb / statistics.median(s) for name, s in seconds.items()}
    return {
        "writer_mb_s": round(mb_s["writer_records"], 1),
        "raw_mb_s": round(mb_s["raw"], 1),
        "ratio": round(mb_s["writer_records"] / mb_s["raw"], 3),
        "table_writer_mb_s": round(mb_s["writer_table"], 1),
        "table_ratio": round(mb_s["writer_table"] / mb_s["raw"], 3),
        "seconds": {name: [round(x, 3) for x in s] for name, s in seconds.items()},
    }


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process (so it does not share our GIL), on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto server did not start within 30 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compression", default=WriterConfig.compression)
    args = parser.parse_args()

    records = make_records(args.rows)
    table = records_to_table(records)
    results: dict = {
        "rows": args.rows,
        "table_mb": round(table.nbytes / 1e6, 1),
        "compression": args.compression,
        "repeats": args.repeats,
        "statistic": "median",
        "writer_config": {"flush_bytes": WriterConfig.flush_bytes, "chunk_records": WriterConfig.chunk_records},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pyarrow": pa.__version__},
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        # The machine may be shared: a load well above the core count makes every figure noisy.
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }
    with tempfile.TemporaryDirectory(prefix="log-bench-") as tmp:
        local = open_store(Path(tmp, "data").as_uri())
        results["local"] = measure(records, table, local, Path(tmp, "spool"), args.repeats, args.compression)

        # moto accepts any credentials; these keep the AWS chain from looking elsewhere.
        os.environ.update(
            AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true"
        )
        server, endpoint = start_moto()
        try:
            boto3.client("s3", endpoint_url=endpoint, region_name=REGION).create_bucket(Bucket="bench")
            config = StorageConfig(root="s3://bench/log", s3_endpoint_url=endpoint, s3_region=REGION)
            s3 = open_store(config=config)
            results["s3"] = measure(records, table, s3, Path(tmp, "spool"), args.repeats, args.compression)
        finally:
            server.terminate()
            server.wait(timeout=30)

    results["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{args.rows} rows, {results['table_mb']} MB in Arrow, {args.compression}, median of {args.repeats}")
    print(f"{'target':<8}{'raw MB/s':>10}{'writer MB/s':>13}{'ratio':>7}{'table-fed MB/s':>16}{'ratio':>7}")
    for target in ("local", "s3"):
        r = results[target]
        print(
            f"{target:<8}{r['raw_mb_s']:>10.1f}{r['writer_mb_s']:>13.1f}{r['ratio']:>7.3f}"
            f"{r['table_writer_mb_s']:>16.1f}{r['table_ratio']:>7.3f}"
        )
    print(f"goal: local ratio >= 0.8 -> {'met' if results['local']['ratio'] >= 0.8 else 'NOT met'}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
