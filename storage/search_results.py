"""Results of architecture search: one Parquet row per evaluated candidate, plus the run's best genome.

Layout under the store root:

    search/<run_id>/part-<time>-<uuid>.parquet   evaluation rows (one small file per append)
    search/<run_id>/best_genome.json            the genome the run chose, with its full ModelConfig
    search/LATEST.json                          {"run_id"} of the last run that saved a best genome

Evaluations take seconds to minutes each, so a part per append costs nothing and means every
recorded evaluation survives a crash of the coordinator: a resumed run reads them back and goes on
from there. Appends are at-least-once; `read` keeps the first row of each `candidate_id`.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from model.config import ModelConfig
from storage.config import StorageConfig
from storage.errors import CorruptDataError, NotFoundError
from storage.uri import Store, as_store, check_key

SEARCH_PREFIX = "search"
LATEST = f"{SEARCH_PREFIX}/LATEST.json"
BEST_GENOME = "best_genome.json"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")

RESULT_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("candidate_id", pa.string()),
    ("seq", pa.int64()),  # completion order within the run: the order aging evolution saw results in
    ("genome_key", pa.string()),
    ("genome", pa.string()),  # JSON of the genes
    ("parent_id", pa.string()),  # null for the random initial population
    ("status", pa.string()),  # "ok" or "failed"
    ("bpb", pa.float64()),  # held-out bits per byte (null when failed)
    ("params", pa.int64()),
    ("bytes_per_s", pa.float64()),
    ("train_seconds", pa.float64()),
    ("objective", pa.float64()),  # what selection minimised
    ("worker", pa.string()),
    ("attempts", pa.int64()),  # evaluations started, > 1 after a worker died mid-evaluation
    ("reused_from", pa.string()),  # candidate_id whose result was reused for an identical genome
    ("error", pa.string()),
    ("created", pa.timestamp("us", tz="UTC")),
])


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r} must be 1-100 letters, digits, '-' or '_', "
                         f"starting with a letter or digit")
    return run_id


class SearchResults:
    """The evaluation rows and documents of one search run."""

    def __init__(self, store_or_uri: Store | str | None, run_id: str,
                 storage_config: StorageConfig | None = None) -> None:
        self.store = as_store(store_or_uri, storage_config)
        self.run_id = check_run_id(run_id)
        self.prefix = f"{SEARCH_PREFIX}/{run_id}"

    # -- evaluation rows -----------------------------------------------------------------------
    def append(self, rows: Iterable[Mapping[str, Any]]) -> str | None:
        """Write `rows` (dicts keyed by RESULT_SCHEMA names) as one new Parquet part; returns its key."""
        rows = [dict(row) for row in rows]
        if not rows:
            return None
        now = datetime.now(UTC)
        for row in rows:
            unknown = sorted(set(row) - set(RESULT_SCHEMA.names))
            if unknown:
                raise ValueError(f"unknown search result columns {unknown}; known: {RESULT_SCHEMA.names}")
            row.setdefault("created", now)
            row["run_id"] = self.run_id
        table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        key = f"{self.prefix}/part-{now.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:12]}.parquet"
        self.store.write_bytes(key, buffer.getvalue())
        return key

    def parts(self) -> list[str]:
        return [k for k in self.store.list(self.prefix + "/part-") if k.endswith(".parquet")]

    def read(self) -> pa.Table:
        """Every recorded evaluation of the run, first row per candidate_id, sorted by `seq`."""
        keys = self.parts()
        if not keys:
            return RESULT_SCHEMA.empty_table()
        try:
            dataset = ds.dataset([self.store.path(k) for k in keys], schema=RESULT_SCHEMA, format="parquet",
                                 filesystem=self.store.filesystem())
            table = dataset.to_table()
        except (pa.ArrowException, OSError) as error:
            raise CorruptDataError(f"search results under {self.store.uri_of(self.prefix)} are unreadable "
                                   f"({error}); remove the damaged part to resume the run") from error
        if table.num_rows == 0:
            return table
        indexed = table.select(["candidate_id"]).append_column("_row", pa.array(np.arange(table.num_rows)))
        first = indexed.group_by("candidate_id", use_threads=False).aggregate([("_row", "min")])["_row_min"]
        table = table.take(np.sort(first.to_numpy()))
        return table.sort_by([("seq", "ascending"), ("candidate_id", "ascending")])

    def rows(self) -> list[dict[str, Any]]:
        return self.read().to_pylist()

    # -- documents -----------------------------------------------------------------------------
    def write_json(self, name: str, document: Mapping[str, Any]) -> str:
        key = check_key(f"{self.prefix}/{name}")
        self.store.write_bytes(key, json.dumps(dict(document), indent=2, sort_keys=True).encode())
        return key

    def read_json(self, name: str) -> dict[str, Any]:
        key = check_key(f"{self.prefix}/{name}")
        data = self.store.read_bytes(key)
        try:
            return json.loads(data)
        except ValueError as error:
            raise CorruptDataError(f"{self.store.uri_of(key)} is not valid JSON ({error})") from error

    def save_best_genome(self, document: Mapping[str, Any]) -> str:
        """Store the run's choice ({"genome", "config", ...}) and point `search/LATEST.json` at this run."""
        if not isinstance(document.get("config"), dict):
            raise ValueError("a best-genome document needs its full ModelConfig under 'config'")
        key = self.write_json(BEST_GENOME, {**document, "run_id": self.run_id})
        self.store.write_bytes(LATEST, json.dumps({"run_id": self.run_id}).encode())
        return key


def latest_run_id(store_or_uri: Store | str | None = None, storage_config: StorageConfig | None = None) -> str:
    store = as_store(store_or_uri, storage_config)
    try:
        return check_run_id(json.loads(store.read_bytes(LATEST))["run_id"])
    except NotFoundError:
        raise NotFoundError(f"no search has saved a best genome under {store.uri_of(SEARCH_PREFIX)}; "
                            f"run `reverie search` first") from None
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptDataError(f"{store.uri_of(LATEST)} is unreadable ({error}); rerun a search") from error


def load_best_genome(store_or_uri: Store | str | None = None, run_id: str | None = None,
                     storage_config: StorageConfig | None = None) -> ModelConfig:
    """The student architecture for the next sleep: the best genome of `run_id` (default: the latest
    run that chose one), as the full ModelConfig it was evaluated with."""
    store = as_store(store_or_uri, storage_config)
    run_id = run_id or latest_run_id(store)
    results = SearchResults(store, run_id)
    try:
        document = results.read_json(BEST_GENOME)
    except NotFoundError:
        raise NotFoundError(f"search run {run_id} has no {BEST_GENOME} in {store.uri_of(results.prefix)}; "
                            f"did it finish?") from None
    try:
        return ModelConfig.from_dict(document["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptDataError(f"{store.uri_of(results.prefix + '/' + BEST_GENOME)} holds no valid ModelConfig "
                               f"({error})") from error
