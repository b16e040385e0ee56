"""Storage settings: the one place in `storage` that reads environment variables.

A `StorageConfig` is plain data (picklable, so it can be shipped to Ray workers and subprocesses);
`from_env()` builds one from the environment. Credentials are deliberately absent: boto3 and
pyarrow both follow the standard AWS chain (env vars, shared config/credentials files, SSO,
instance and container roles), so nothing secret ever lives in our config objects or logs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ROOT = "./reverie-data"
DEFAULT_SPOOL = "./reverie-data/.spool"


def to_uri(location: str) -> str:
    """`s3://...` and `file://...` pass through; a plain path becomes `file://<absolute path>`."""
    if location.startswith(("s3://", "file://")):
        return location
    if "://" in location:
        raise ValueError(f"unsupported storage URI {location!r}: use file://PATH, s3://BUCKET/PREFIX or a path")
    return Path(location).expanduser().resolve().as_uri()


@dataclass(frozen=True)
class StorageConfig:
    """Where data lives and how to reach S3-compatible services.

    root: data root URI, `file:///abs/path` or `s3://bucket/prefix`.
    s3_endpoint_url: endpoint of an S3-compatible service (MinIO, moto, R2, ...); None means AWS.
    s3_region: signing region; None means `us-east-1`.
    spool_dir: local directory where experience writers park files while the store is unreachable.
    s3_max_attempts / timeouts: botocore and pyarrow retry budget per request; kept small so that
        an outage is noticed in seconds and the writer's spool takes over.
    """

    root: str = field(default_factory=lambda: to_uri(DEFAULT_ROOT))
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    spool_dir: str = field(default_factory=lambda: str(Path(DEFAULT_SPOOL).resolve()))
    s3_max_attempts: int = 3
    s3_connect_timeout_s: float = 5.0
    s3_read_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", to_uri(self.root))

    @property
    def region(self) -> str:
        return self.s3_region or "us-east-1"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StorageConfig:
        """Read REVERIE_DATA, REVERIE_SPOOL, REVERIE_S3_ENDPOINT_URL (else AWS_ENDPOINT_URL_S3,
        AWS_ENDPOINT_URL) and AWS_REGION (else AWS_DEFAULT_REGION)."""
        env = os.environ if env is None else env
        endpoint = env.get("REVERIE_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        spool = env.get("REVERIE_SPOOL") or DEFAULT_SPOOL
        return cls(
            root=env.get("REVERIE_DATA") or DEFAULT_ROOT,
            s3_endpoint_url=endpoint or None,
            s3_region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            spool_dir=str(Path(spool).expanduser().resolve()),
        )
