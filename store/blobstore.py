"""The blob store a deployment uses: S3-compatible object storage or files on a disk."""

from __future__ import annotations

from mmbatch.settings import Settings
from store.blobs import Blobs, BlobStore
from store.s3blobs import S3BlobStore


def open_blob_store(settings: Settings) -> Blobs:
    """The store the settings name: ``MMBATCH_BLOB_URL=s3://bucket/prefix``, or files under
    ``MMBATCH_BLOB_DIR`` (default ``$MMBATCH_DATA_DIR/blobs``)."""
    if settings.blob_url:
        return S3BlobStore.from_settings(settings)
    return BlobStore(settings.blobs)
