"""Blobs in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, …), for deployments that spread
workers over machines without a shared file system.

Same layout as on disk, below a prefix: ``s3://bucket/prefix/ab/cd/abcd…``. A writer spools to a
local temporary file while hashing (the name is only known at the end), then uploads it with
boto3's managed transfer (multipart above 8 MiB) unless a blob with that hash is already there.
An S3 PUT is atomic, so readers see a whole blob or none. Unreachable endpoints and server errors
become :class:`~store.blobs.BlobStoreUnavailable` (a ``ConnectionError``: tasks retry it).

Direct uploads (``web.direct_uploads``) stage an archive below ``prefix/.uploads/<upload id>``:
an S3 multipart upload whose parts the client PUTs to presigned URLs, so the API never carries
the bytes. The ingest worker, which reads the archive anyway, hashes it while downloading and
copies it (inside S3) to its content-addressed key (:meth:`S3BlobStore.adopt_staged`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from mmbatch.settings import Settings
from store.blobs import CHUNK, HEX, BlobNotFound, Blobs, BlobStoreUnavailable, blob_key

NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}
STAGING = ".uploads"  # below the prefix: never a blob's name (``ab/cd/…``), so never listed
# What S3 refuses in a CompleteMultipartUpload that the client can fix (its parts list).
BAD_PARTS = {"InvalidPart", "InvalidPartOrder", "EntityTooSmall", "MalformedXML"}


class PartsRefused(ValueError):
    """S3 would not join the parts the client named (a wrong ETag, a part missing or too
    small): the client's to fix."""


@dataclass(frozen=True)
class StagedPart:
    """A part of a direct upload that S3 has: its number, ETag and size in bytes."""

    number: int
    etag: str
    size: int


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
    def __init__(self, bucket: str, prefix: str, client: Any, spool_dir: Path,
                 presign_client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client
        # Presigned URLs name the endpoint clients reach (MMBATCH_S3_PRESIGN_ENDPOINT_URL).
        self.presign_client = presign_client or client
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
        session = boto3.session.Session()
        client = session.client("s3", config=config, **options)
        # SigV4 for presigned URLs (what every S3-compatible store takes), by the public name.
        presign = session.client(
            "s3", config=config.merge(Config(signature_version="s3v4")),
            **{**options, "endpoint_url": settings.s3_presign_endpoint_url
               or options["endpoint_url"]})
        return cls(bucket, prefix, client, settings.data_dir.resolve() / "spool", presign)

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

    # Direct uploads: an S3 multipart upload at a staging key, parts PUT by the client.

    def staged_key(self, upload_id: str) -> str:
        key = f"{STAGING}/{upload_id}"
        return f"{self.prefix}/{key}" if self.prefix else key

    def start_staged(self, upload_id: str) -> str:
        """Begin the multipart upload of a direct upload; S3's UploadId."""
        with _translated():
            answer = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=self.staged_key(upload_id),
                ContentType="application/octet-stream")
        return str(answer["UploadId"])

    def part_url(self, upload_id: str, multipart_id: str, number: int, seconds: int) -> str:
        """A presigned URL that takes part ``number`` by a plain HTTP PUT for ``seconds``."""
        return str(self.presign_client.generate_presigned_url(
            "upload_part", ExpiresIn=seconds,
            Params={"Bucket": self.bucket, "Key": self.staged_key(upload_id),
                    "UploadId": multipart_id, "PartNumber": number}))

    def staged_parts(self, upload_id: str, multipart_id: str) -> list[StagedPart]:
        """The parts S3 has of an unfinished direct upload (BlobNotFound once it is completed
        or aborted)."""
        paginator = self.client.get_paginator("list_parts")
        with _translated(upload_id):
            return [StagedPart(int(p["PartNumber"]), str(p["ETag"]), int(p["Size"]))
                    for page in paginator.paginate(Bucket=self.bucket, UploadId=multipart_id,
                                                   Key=self.staged_key(upload_id))
                    for p in page.get("Parts", [])]

    def complete_staged(self, upload_id: str, multipart_id: str,
                        parts: list[tuple[int, str]]) -> None:
        """Join the parts (number, ETag) into the staged object; PartsRefused when S3 will not."""
        try:
            with _translated(upload_id):
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self.staged_key(upload_id), UploadId=multipart_id,
                    MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag}
                                               for n, etag in parts]})
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in BAD_PARTS:
                raise PartsRefused(exc.response["Error"].get("Message") or str(exc)) from exc
            raise

    def staged_size(self, upload_id: str) -> int:
        """The completed staged object's size (BlobNotFound when there is none)."""
        with _translated(upload_id):
            head = self.client.head_object(Bucket=self.bucket, Key=self.staged_key(upload_id))
        return int(head["ContentLength"])

    def staged_head(self, upload_id: str, size: int = 512) -> bytes:
        """The first ``size`` bytes of the completed staged object (to recognise an archive)."""
        with _translated(upload_id):
            body = self.client.get_object(Bucket=self.bucket, Key=self.staged_key(upload_id),
                                          Range=f"bytes=0-{size - 1}")["Body"]
            with body:
                return bytes(body.read())

    def abort_staged(self, upload_id: str, multipart_id: str | None) -> None:
        """Forget a direct upload: its parts (an unfinished multipart upload) and its staged
        object (a completed one); either may be gone already."""
        if multipart_id is not None:
            with contextlib.suppress(BlobNotFound), _translated(upload_id):
                self.client.abort_multipart_upload(Bucket=self.bucket, UploadId=multipart_id,
                                                   Key=self.staged_key(upload_id))
        with _translated(upload_id):
            self.client.delete_object(Bucket=self.bucket, Key=self.staged_key(upload_id))

    @contextlib.contextmanager
    def adopt_staged(self, upload_id: str) -> Iterator[tuple[Path, str]]:
        """A completed direct upload as a blob: downloaded to a local file while hashing (the
        reader needs the file anyway), copied inside S3 to its content-addressed key unless
        that blob is there already; (the local file, the blob's name) while the block runs.
        The staged object stays: the caller deletes it once the job records the blob."""
        fd, name = tempfile.mkstemp(prefix=".download-", dir=self.spool_dir)
        tmp = Path(name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, _translated(upload_id):
                body = self.client.get_object(Bucket=self.bucket,
                                              Key=self.staged_key(upload_id))["Body"]
                with body:
                    while chunk := body.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            name = digest.hexdigest()
            if not self.exists(name):
                with _translated(upload_id):  # managed copy: multipart above 5 GB
                    self.client.copy({"Bucket": self.bucket, "Key": self.staged_key(upload_id)},
                                     self.bucket, self.key(name))
            yield tmp, name
        finally:
            tmp.unlink(missing_ok=True)
