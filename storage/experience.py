"""The experience log: every served turn, as Hive-partitioned Parquet under `<root>/experience/`.

    experience/date=YYYY-MM-DD/part-<utc time>-<random>.parquet

This module is the public face; the parts live in `records` (schema and record),
`experience_writer` (buffered, spooling writer) and `experience_reader` (deduplicating reader).
The files are plain Parquet: `pyarrow.dataset.dataset(path, partitioning="hive")` and
`pandas.read_parquet(path)` read the directory as it is.
"""

from storage.experience_reader import ExperienceReader, drop_duplicate_events
from storage.experience_writer import EXPERIENCE_PREFIX, ExperienceWriter, WriterConfig, WriterStats
from storage.records import EXPERIENCE_SCHEMA, ExperienceRecord, records_to_table, table_to_records

__all__ = [
    "EXPERIENCE_PREFIX",
    "EXPERIENCE_SCHEMA",
    "ExperienceReader",
    "ExperienceRecord",
    "ExperienceWriter",
    "WriterConfig",
    "WriterStats",
    "drop_duplicate_events",
    "records_to_table",
    "table_to_records",
]
