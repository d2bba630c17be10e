"""The client's streamed multipart body: what Werkzeug parses out of it is what was sent."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from werkzeug.formparser import parse_form_data
from werkzeug.test import EnvironBuilder

from cli.client import MultipartFile


@pytest.mark.parametrize("read_size", [1, 7, 8192, 1 << 20, -1])
def test_multipart_body_streams_fields_and_file(tmp_path: Path, read_size: int) -> None:
    payload = bytes(range(256)) * 4099  # not a multiple of any read size
    archive = tmp_path / 'ph"otos été.tar'
    archive.write_bytes(payload)
    with open(archive, "rb") as f:
        body = MultipartFile({"kind": "classify", "model": "3"}, "archive", archive.name, f)
        chunks = []
        while True:
            chunk = body.read(read_size)
            if not chunk:
                break
            assert read_size < 0 or len(chunk) <= read_size
            chunks.append(chunk)
    raw = b"".join(chunks)
    assert len(raw) == len(body)  # the Content-Length the request announces
    environ = EnvironBuilder(method="POST", input_stream=io.BytesIO(raw),
                             content_type=body.content_type, content_length=len(raw)).get_environ()
    _, form, files = parse_form_data(environ)
    assert dict(form) == {"kind": "classify", "model": "3"}
    assert files["archive"].read() == payload
    assert files["archive"].filename == 'ph_otos été.tar'
