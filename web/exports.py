"""Results exports streamed page by page: JSON lines, CSV, or Parquet (pyarrow).

Each page is read in its own short transaction, so a long download never holds the database.
Parquet cannot be written to a socket as it goes (its footer comes last), so it is written to a
temporary file one row group per page and then streamed from there.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from typing import Any, Iterator

from flask import Response, stream_with_context

from store import jobs
from store.db import Database
from store.schema import Job
from web.serializers import result_payload

FORMATS = ("jsonl", "csv", "parquet")
PAGE = 1000
COLUMNS = ["item_id", "key", "modalities", "audio_source", "status", "label", "confidence",
           "top_k", "given_label", "split", "error", "explanation"]


def rows(db: Database, job: Job, with_embeddings: bool) -> Iterator[list[dict[str, Any]]]:
    """The export's rows, a page at a time: each item's result as the API shows it, in the
    export's columns (embeddings as stored, not rounded)."""
    columns = COLUMNS + (["embedding"] if with_embeddings else [])
    after = 0
    while True:
        with db.session() as s:
            page = jobs.results_page(s, job, after=after, limit=PAGE)
            out = [{k: payload[k] for k in columns}
                   for payload in (result_payload(item, result, with_embeddings, None)
                                   for item, result in page)]
        if not out:
            return
        yield out
        after = out[-1]["item_id"]
        if len(out) < PAGE:
            return


def export(db: Database, job: Job, fmt: str, with_embeddings: bool) -> Response:
    name = f"{job.id}.{fmt}"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    if fmt == "jsonl":
        body = (("".join(json.dumps(r) + "\n" for r in page)) for page in rows(db, job,
                                                                              with_embeddings))
        return Response(stream_with_context(body), mimetype="application/x-ndjson",
                        headers=headers)
    if fmt == "csv":
        return Response(stream_with_context(_csv(db, job, with_embeddings)), mimetype="text/csv",
                        headers=headers)
    return Response(stream_with_context(_parquet(db, job, with_embeddings)),
                    mimetype="application/vnd.apache.parquet", headers=headers)


def _csv(db: Database, job: Job, with_embeddings: bool) -> Iterator[str]:
    columns = COLUMNS + (["embedding"] if with_embeddings else [])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for page in rows(db, job, with_embeddings):
        for r in page:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                             for k, v in r.items()})
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
    yield buf.getvalue()


def _parquet(db: Database, job: Job, with_embeddings: bool) -> Iterator[bytes]:
    # pyarrow (~40 MB resident) only in a web process that writes Parquet: it stays small.
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [("item_id", pa.int64()), ("key", pa.string()), ("modalities", pa.list_(pa.string())),
              ("audio_source", pa.string()), ("status", pa.string()), ("label", pa.string()), ("confidence", pa.float64()),
              ("top_k", pa.string()), ("given_label", pa.string()), ("split", pa.string()),
              ("error", pa.string()), ("explanation", pa.string())]
    if with_embeddings:
        fields.append(("embedding", pa.list_(pa.float32())))
    schema = pa.schema(fields)
    with tempfile.TemporaryFile() as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for page in rows(db, job, with_embeddings):
                for r in page:  # nested JSON objects travel as JSON text
                    r["top_k"] = None if r["top_k"] is None else json.dumps(r["top_k"])
                    r["explanation"] = (None if r["explanation"] is None
                                        else json.dumps(r["explanation"]))
                writer.write_table(pa.Table.from_pylist(page, schema=schema))
        tmp.seek(0)
        while chunk := tmp.read(1 << 20):
            yield chunk
