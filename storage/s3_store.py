"""`s3://` backend: boto3 for bytes and conditional writes, pyarrow's S3FileSystem for Parquet.

Both clients take the endpoint and region from `StorageConfig` and credentials from the standard
AWS chain, so the same code talks to AWS, MinIO or moto. Retries are the libraries' own (botocore
"standard" mode, pyarrow's AwsStandardS3RetryStrategy), with small budgets so outages surface fast.

Conditional writes follow S3's documented semantics: `If-None-Match: *` creates once and
`If-Match: <etag>` swaps; a failed condition is 412, a concurrent conditional write may get 409
and is retried. A retried request whose first attempt actually landed would see its own write as
a 412; we recognise that case by comparing the ETag with our body's MD5 (single-part PUTs without
KMS), which is why documents that must never compare equal carry a nonce.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from urllib.parse import urlparse

import boto3
import pyarrow.fs as pafs
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from storage.config import StorageConfig
from storage.errors import ConflictError, NotFoundError, StorageError
from storage.uri import Store, check_key

_CONFLICT_RETRIES = 5
_MISSING = {"404", "NoSuchKey", "NotFound"}


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _etag_of(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


class S3Store(Store):
    """Objects under `s3://bucket/prefix`; see the module docstring."""

    def __init__(self, uri: str, config: StorageConfig | None = None) -> None:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"not an S3 URI: {uri!r}; expected s3://BUCKET[/PREFIX]")
        self.config = config or StorageConfig.from_env()
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def __getstate__(self) -> dict:
        # boto3 clients and pyarrow filesystems are rebuilt per process; only the address travels.
        return {"uri": self.uri, "config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["uri"], state["config"])

    @cached_property
    def client(self):
        cfg = self.config
        botocore_config = Config(
            retries={"max_attempts": cfg.s3_max_attempts, "mode": "standard"},
            connect_timeout=cfg.s3_connect_timeout_s,
            read_timeout=cfg.s3_read_timeout_s,
            # S3-compatible services are usually addressed by path; AWS itself by virtual host.
            s3={"addressing_style": "path" if cfg.s3_endpoint_url else "auto"},
        )
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=cfg.s3_endpoint_url, region_name=cfg.region, config=botocore_config)

    @cached_property
    def _fs(self) -> pafs.S3FileSystem:
        cfg = self.config
        return pafs.S3FileSystem(
            region=cfg.region,
            endpoint_override=cfg.s3_endpoint_url,
            connect_timeout=cfg.s3_connect_timeout_s,
            request_timeout=cfg.s3_read_timeout_s,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.s3_max_attempts),
        )

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _translate(self, error: Exception, action: str, key: str) -> StorageError:
        """Our error for a boto error, naming the object and what to check."""
        if isinstance(error, ClientError):
            code = _code(error)
            if code in _MISSING:
                return NotFoundError(f"{self.uri_of(key)} does not exist")
            hint = {
                "NoSuchBucket": f"create bucket {self.bucket!r} first",
                "AccessDenied": "check the AWS credentials and the bucket policy",
                "InvalidAccessKeyId": "check the AWS credentials",
                "SignatureDoesNotMatch": "check the AWS credentials and region",
            }.get(code, "check the endpoint, credentials and bucket")
            return StorageError(f"S3 {action} of {self.uri_of(key)} failed ({code or _status(error)}: {error}); {hint}")
        endpoint = self.config.s3_endpoint_url or "AWS"
        return StorageError(f"S3 {action} of {self.uri_of(key)} failed: {error}; is {endpoint} reachable?")

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError) as e:
            raise self._translate(e, action, key) from e

    # -- reads ---------------------------------------------------------------------------------
    def read_with_token(self, key: str) -> tuple[bytes, str]:
        with self._errors("GET", key):
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read(), response["ETag"]

    def read_bytes(self, key: str) -> bytes:
        return self.read_with_token(key)[0]

    def exists(self, key: str) -> bool:
        try:
            with self._errors("HEAD", key):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except NotFoundError:
            return False

    def _etag(self, key: str) -> str | None:
        try:
            with self._errors("HEAD", key):
                return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ETag"]
        except NotFoundError:
            return None

    def list(self, prefix: str = "") -> list[str]:
        check_key(prefix, prefix=True)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        with self._errors("LIST", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for item in page.get("Contents", []):
                    key = item["Key"][strip:]
                    if not any(part.startswith(".") for part in key.split("/")):
                        keys.append(key)
        return sorted(keys)

    # -- writes --------------------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes | memoryview) -> None:
        body = data if isinstance(data, bytes) else bytes(data)  # botocore takes bytes or files only
        with self._errors("PUT", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body)

    def _conditional_put(self, key: str, data: bytes, **condition: str) -> bool:
        """PUT with a precondition; False on 412 unless the object already holds exactly `data`."""
        for attempt in range(_CONFLICT_RETRIES):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
                return True
            except ClientError as e:
                if _status(e) == 409 and attempt + 1 < _CONFLICT_RETRIES:
                    time.sleep(0.05 * 2**attempt)  # a concurrent conditional write is in flight
                    continue
                if _status(e) == 412 or _code(e) in _MISSING:
                    return self._etag(key) == _etag_of(data)
                raise self._translate(e, "conditional PUT", key) from e
            except BotoCoreError as e:
                raise self._translate(e, "conditional PUT", key) from e
        return False

    def create_if_absent(self, key: str, data: bytes) -> bool:
        return self._conditional_put(key, data, IfNoneMatch="*")

    def compare_and_swap(self, key: str, data: bytes, expected_token: str) -> str:
        if not self._conditional_put(key, data, IfMatch=expected_token):
            raise ConflictError(
                f"compare-and-swap on {self.uri_of(key)} failed: it changed or vanished since it was read "
                f"(ETag {expected_token} expected); re-read and decide again"
            )
        return _etag_of(data)

    def delete(self, key: str) -> None:
        with self._errors("DELETE", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    # -- pyarrow -------------------------------------------------------------------------------
    def filesystem(self) -> pafs.FileSystem:
        return self._fs

    def path(self, key: str = "") -> str:
        return f"{self.bucket}/{self._key(key)}" if key else f"{self.bucket}/{self.prefix}".rstrip("/")
