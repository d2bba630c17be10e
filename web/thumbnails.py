"""Image thumbnails (and a clip's poster frame) for the dashboard, made once per file and kept on
disk by content hash.

A media file is stored once under its SHA-256, so that hash names its thumbnail too: every item,
job and tenant showing the same picture shares one file, made the first time any of them asks.
Thumbnails live under ``$DATA_DIR/thumbnails/ab/<sha256>-<size>.jpg`` (beside the blobs, so
every web process of a deployment sees the same ones) and are written to a temporary file then
renamed into place, so a reader sees a whole thumbnail or none.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
from pathlib import Path

from flask import Response, current_app, send_file
from PIL import Image

from media.decode import MediaError
from media.sandbox import DecodeSandbox
from store.blobs import BlobNotFound, Blobs, check_digest
from web.errors import ApiError

log = logging.getLogger(__name__)

SIZE = 160  # the longer side, in pixels
QUALITY = 85


class ThumbnailError(ValueError):
    """The media file is not an image Pillow can read within the limits."""


class Thumbnails:
    def __init__(self, root: Path, blobs: Blobs, max_pixels: int, size: int = SIZE,
                 timeout: float = 60.0) -> None:
        self.root = Path(root)
        self.blobs = blobs
        self.max_pixels = max_pixels
        self.size = size
        self.timeout = timeout
        self._decoder: DecodeSandbox | None = None
        self._sandbox_lock = threading.Lock()
        self.made = 0  # thumbnails this process rendered (the rest came from disk)
        self._lock = threading.Lock()

    def path(self, digest: str) -> Path:
        check_digest(digest)  # 64 lowercase hex characters, or BlobNotFound
        return self.root / digest[:2] / f"{digest}-{self.size}.jpg"

    def get(self, digest: str, video: bool = False) -> Path:
        """The thumbnail of blob ``digest``, made now if it does not exist yet.

        Raises BlobNotFound for a blob that is not stored, ThumbnailError for one that is not a
        readable image.
        """
        target = self.path(digest)
        if target.exists():
            return target
        with self._lock:  # threads of one process render each image once
            if target.exists():
                return target
            data = self.render(self.blobs.read(digest), video)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".thumb-", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self.made += 1
            log.info("thumbnail_made blob=%s bytes=%d", digest, len(data))
        return target

    def render(self, data: bytes, video: bool = False) -> bytes:
        """Decode as the worker does (the same five formats, the same pixel limit) in a child
        process of the decode sandbox, so a hostile file cannot hang or crash the web process
        or reach a Pillow plugin the worker never uses; resize and encode here. ``video``: the
        clip's poster frame, its first frame that is neither black nor blank."""
        try:
            if video:
                clip = self._sandbox().decode_video(data, "poster", poster=True,
                                                    max_pixels=self.max_pixels)
                if not clip.frames:
                    raise ThumbnailError("not a readable clip: no video frames")
                image = Image.fromarray(clip.frames[0].rgb)
            else:
                image = self._sandbox().decode_image(data, "thumbnail",
                                                     max_pixels=self.max_pixels)
        except MediaError as exc:
            raise ThumbnailError(f"not a readable {'clip' if video else 'image'}: {exc}"
                                 ) from exc
        image.thumbnail((self.size, self.size))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=QUALITY)
        return out.getvalue()

    def _sandbox(self) -> DecodeSandbox:
        with self._sandbox_lock:
            if self._decoder is None:
                self._decoder = DecodeSandbox(processes=1, timeout=self.timeout)
            return self._decoder

    def close(self) -> None:
        with self._sandbox_lock:
            if self._decoder is not None:
                self._decoder.close()
                self._decoder = None


__all__ = ["BlobNotFound", "ThumbnailError", "Thumbnails"]


def thumbnail_response(entry: dict[str, str], item_id: int, video: bool = False) -> Response:
    """The thumbnail of an item's image (``entry``: its media record; ``video``: its clip's
    poster frame) as the dashboard and the API serve it: cached by the browser a day, 404 when
    the blob is gone, 422 when it does not decode."""
    try:
        path = current_app.extensions["mmbatch_thumbnails"].get(entry["blob"], video)
    except BlobNotFound:
        raise ApiError(404, "not_found", f"the image of item {item_id} is no longer stored")
    except ThumbnailError as exc:
        raise ApiError(422, "unreadable_image", str(exc)) from None
    response = send_file(path, mimetype="image/jpeg", conditional=True, etag=entry["blob"])
    response.headers["Cache-Control"] = "private, max-age=86400"
    return response
