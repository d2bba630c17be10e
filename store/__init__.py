"""Persistence: the schema, sessions, queries and blob storage."""

from store.blobs import BlobStore
from store.db import Database

__all__ = ["BlobStore", "Database"]
