"""Blobs in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, …), for deployments that spread
workers over machines without a shared file system.

Same layout as on disk, below a prefix: ``s3://bucket/prefix/ab/cd/abcd…``. A writer spools to a
local temporary file while hashing (the name is only known at the end), then uploads it with
boto3's managed transfer (multipart above 8 MiB) unless a blob with that hash is already there.
An S3 PUT is atomic, so readers see a whole blob or none. Unreachable endpoints and server errors
become :class:`~store.blobs.BlobStoreUnavailable` (a ``ConnectionError``: tasks retry it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from mmbatch.settings import Settings
from store.blobs import HEX, BlobNotFound, Blobs, BlobStoreUnavailable, blob_key

NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, "some/prefix")."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket[/prefix] URL: {url!r}")
    return parsed.netloc, parsed.path.strip("/")


@contextlib.contextmanager
def _translated(digest: str = "") -> Iterator[None]:
    """botocore's errors as the store's: missing -> BlobNotFound, 5xx/unreachable -> transient."""
    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in NOT_FOUND or status == 404:
            raise BlobNotFound(digest) from exc
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable"):
            raise BlobStoreUnavailable(f"object storage: {exc}") from exc
        raise
    except BotoCoreError as exc:  # connection refused, timeouts, DNS
        raise BlobStoreUnavailable(f"object storage unreachable: {exc}") from exc


class S3BlobStore(Blobs):
    def __init__(self, bucket: str, prefix: str, client: Any, spool_dir: Path) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> S3BlobStore:
        bucket, prefix = parse_s3_url(settings.blob_url)
        # Empty settings leave boto3 its own chain (AWS_* variables, ~/.aws, instance roles).
        options: dict[str, Any] = {
            "endpoint_url": settings.s3_endpoint_url or None,
            "region_name": settings.s3_region or None,
            "aws_access_key_id": settings.s3_access_key_id or None,
            "aws_secret_access_key": settings.s3_secret_access_key or None,
        }
        config = Config(retries={"max_attempts": 5, "mode": "standard"},
                        connect_timeout=10, read_timeout=60,
                        # MinIO, Ceph and moto serve buckets by path, not by host name.
                        s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"})
        client = boto3.session.Session().client("s3", config=config, **options)
        return cls(bucket, prefix, client, settings.data_dir.resolve() / "spool")

    def key(self, digest: str) -> str:
        key = blob_key(digest)
        return f"{self.prefix}/{key}" if self.prefix else key

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _install(self, tmp: Path, digest: str) -> None:
        if self.exists(digest):
            return
        with _translated(digest):
            self.client.upload_file(str(tmp), self.bucket, self.key(digest))

    def open(self, digest: str) -> BinaryIO:
        with _translated(digest):
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(digest))["Body"]
        return body  # type: ignore[no-any-return]  # botocore's StreamingBody, an io.IOBase

    def read(self, digest: str) -> bytes:
        with _translated(digest), self.open(digest) as body:
            return body.read()

    def exists(self, digest: str) -> bool:
        try:
            with _translated(digest):
                self.client.head_object(Bucket=self.bucket, Key=self.key(digest))
        except BlobNotFound:
            return False
        return True

    def delete(self, digest: str) -> None:
        with _translated(digest):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(digest))

    def local_file(self, digest: str) -> Path | None:
        return None

    def __iter__(self) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        start = f"{self.prefix}/" if self.prefix else ""
        with _translated():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(start):]
                    digest = name.rsplit("/", 1)[-1]
                    if len(digest) == 64 and HEX.issuperset(digest) and name == blob_key(digest):
                        yield digest
