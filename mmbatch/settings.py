"""Typed settings read from the environment (prefix ``MMBATCH_``).

Of the project it imports only the vocabulary (``mmbatch.contract``), and nothing reads
configuration at module level. Build one ``Settings`` with :meth:`Settings.from_env` and pass it
to what needs it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mmbatch.contract import MODEL_QUEUE, TASK_QUEUES

PREFIX = "MMBATCH_"
MAX_VIDEO_FRAMES = 64  # frames sampled per clip, at most (each is one image encoder input)


class SettingsError(ValueError):
    """A configuration value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    """Everything configurable, with the embedded default when nothing is set."""

    data_dir: Path = Path("var")
    # Empty means the embedded default under data_dir (SQLite; kombu's SQLAlchemy transport).
    database_url: str = ""
    broker_url: str = ""
    # Prefix for every Redis key the broker uses, so deployments can share one Redis.
    broker_prefix: str = ""
    blob_dir: Path | None = None
    # Blobs in an S3-compatible bucket instead: s3://bucket[/prefix]. The endpoint (MinIO, Ceph,
    # …) and credentials may be left empty for boto3's own chain (AWS_* variables, roles).
    blob_url: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    # The endpoint that presigned URLs for direct uploads name (web.direct_uploads), when
    # clients reach the object store by another address than the API does (a MinIO inside a
    # compose network); empty: s3_endpoint_url.
    s3_presign_endpoint_url: str = ""
    # Worker processes serve Prometheus metrics on this port (0: off); see docs/operations.md.
    worker_metrics_port: int = 0
    host: str = "127.0.0.1"
    port: int = 8000
    batch_size: int = 32
    ingest_chunk: int = 500
    top_k: int = 5
    device: str = "auto"
    torch_threads: int = 0
    # Model work: items per encoder forward pass, per modality (a batch task of batch_size items
    # is cut into these), mixed precision, and decoding ahead of the model.
    image_batch_size: int = 8
    text_batch_size: int = 32
    audio_batch_size: int = 32
    precision: str = "auto"  # auto (bf16 where native and checked), fp32, bf16
    # Threads decoding ahead of the model; -1 auto (the cores torch leaves free, 2-8 with a
    # GPU), 0 inline in the model's thread.
    decode_threads: int = -1
    prefetch_items: int = 32  # decoded items held ready ahead of the model, at most
    max_upload_bytes: int = 4 * 1024**3
    # Batches of all jobs together in the broker at once (worker.dispatch tops it up as batches
    # finish): about twice the model workers keeps each fed without queueing a flood ahead of
    # the next job.
    dispatch_window: int = 2
    # Part size of a direct upload to S3 (presigned multipart; at least S3's 5 MiB, and larger
    # when an archive would take more than S3's 10,000 parts).
    direct_part_bytes: int = 64 * 1024**2
    upload_expire_hours: float = 24.0  # a resumable upload nobody finishes is removed after
    max_image_pixels: int = 64_000_000
    audio_max_seconds: float = 30.0
    text_max_chars: int = 100_000
    # Hostile archives and media (docs/reliability.md): limits on what one archive may unpack to,
    # what audio longer than audio_max_seconds does ("cut" it, or "fail" the item), and how long
    # one file may take to decode in the decode sandbox (media.sandbox.DecodeSandbox).
    max_archive_members: int = 100_000
    max_member_bytes: int = 256 * 1024**2
    max_unpacked_bytes: int = 16 * 1024**3
    max_compression_ratio: float = 100.0
    audio_too_long: str = "cut"
    # Video clips (docs/video.md): frames sampled per clip (spread over it, black, blank and
    # near-duplicate frames skipped), how much of a clip is read ("cut" longer clips there, or
    # "fail" them), and the most pixels one frame may have.
    video_frames: int = 8
    video_max_seconds: float = 600.0
    video_too_long: str = "cut"
    video_max_pixels: int = 3840 * 2160
    decode_timeout_seconds: float = 60.0
    # "process": images and audio decode in child processes (a hung or crashing C decoder fails
    # its file, not the worker); "off": in the worker process itself.
    decode_isolation: str = "process"
    train_epochs: int = 300
    train_seed: int = 0
    default_page_size: int = 100
    max_page_size: int = 1000
    log_level: str = "INFO"
    # Strangers: requests per API key per minute (0 turns the limit off).
    rate_limit_per_minute: int = 600
    # Lifecycle: poison items, stale jobs, nightly reprocessing, webhooks.
    poison_limit: int = 3
    stale_after_seconds: int = 600
    sweep_interval_seconds: int = 60
    reprocess_cron: str = "0 2 * * *"
    reprocess_limit: int = 10_000
    reprocess_max_attempts: int = 3
    webhook_secret: str = ""
    # Signs the dashboard's session cookie; empty: made once into $DATA_DIR/secret-key.
    secret_key: str = ""
    # Comma-separated hosts or CIDRs webhooks may reach even though they are private/loopback.
    webhook_allow: str = ""
    webhook_max_attempts: int = 8
    # Search (docs/search.md): where the API finds the search service (comma-separated URLs,
    # tried in turn; empty: http://MMBATCH_HOST:MMBATCH_SEARCH_PORT, which `mmbatch up` starts),
    # its request threads, the index size past which a modality's index is HNSW instead of
    # exact, and how many appended segments make a batch ask for a merge.
    search_url: str = ""
    search_port: int = 8001
    search_threads: int = 4
    index_exact_limit: int = 50_000
    index_merge_segments: int = 8
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> "Settings":
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, f.type, raw)
        values.update(overrides)
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{PREFIX}{name.upper()} must be positive")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                words = ", ".join(choices[:-1]) + " or " + choices[-1]
                raise SettingsError(f"{PREFIX}{name.upper()} must be {words}, "
                                    f"not {getattr(self, name)!r}")
        if self.decode_threads < -1:
            raise SettingsError(f"{PREFIX}DECODE_THREADS must be -1 (auto), 0 (inline) or more")
        if self.video_frames > MAX_VIDEO_FRAMES:
            raise SettingsError(f"{PREFIX}VIDEO_FRAMES must be at most {MAX_VIDEO_FRAMES}")
        if self.max_compression_ratio < 1:
            raise SettingsError(f"{PREFIX}MAX_COMPRESSION_RATIO must be at least 1")
        if self.direct_part_bytes < 5 * 1024**2:
            raise SettingsError(f"{PREFIX}DIRECT_PART_BYTES must be at least 5 MiB (S3's least "
                                "part size)")
        if self.blob_url and not (self.blob_url.startswith("s3://")
                                  and self.blob_url[5:].strip("/")):
            raise SettingsError(f"{PREFIX}BLOB_URL must be s3://bucket[/prefix], "
                                f"not {self.blob_url!r}")
        if not 0 <= self.worker_metrics_port < 65536:
            raise SettingsError(f"{PREFIX}WORKER_METRICS_PORT must be 0 (off) or a port")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise SettingsError(f"{PREFIX}DEVICE must be auto, cpu or cuda[:N], not {self.device!r}")

    # Derived values: the embedded default lives entirely under data_dir.
    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'mmbatch.db').resolve()}"

    @property
    def broker(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def blobs(self) -> Path:
        return (self.blob_dir or self.data_dir / "blobs").resolve()

    @property
    def search_urls(self) -> list[str]:
        """The search service's base URLs (MMBATCH_SEARCH_URL, or the one `mmbatch up` runs)."""
        urls = [u.strip().rstrip("/") for u in self.search_url.split(",") if u.strip()]
        return urls or [f"http://{self.host}:{self.search_port}"]

    @property
    def embedded(self) -> bool:
        return not self.database_url and not self.broker_url

    def celery_config(self) -> dict[str, Any]:
        """What every process that talks to the broker configures alike (the API enqueues, the
        workers consume): where the broker is, JSON only, late acknowledgement, the queues."""
        transport: dict[str, Any] = {}
        if self.broker.startswith("sqla+sqlite"):
            # kombu passes these to create_engine: a long busy timeout, since the web and the
            # worker both write to the SQLite broker file.
            transport["connect_args"] = {"timeout": 60}
        if self.broker_prefix and self.broker.startswith(("redis://", "rediss://")):
            transport["global_keyprefix"] = self.broker_prefix
        return {
            "broker_url": self.broker,
            "broker_transport_options": transport,
            "broker_connection_retry_on_startup": True,
            "result_backend": None,
            "task_ignore_result": True,
            "task_serializer": "json",
            "accept_content": ["json"],
            "event_serializer": "json",
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
            "worker_prefetch_multiplier": 1,
            "task_default_queue": MODEL_QUEUE,
            "task_routes": {task: {"queue": queue} for task, queue in TASK_QUEUES.items()},
            "timezone": "UTC",
            "enable_utc": True,
        }

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env: dict[str, str] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None or value == "":
                continue
            env[PREFIX + f.name.upper()] = str(value)
        return env


# Settings that must be above zero, and those with a fixed set of values.
_POSITIVE = ("port", "batch_size", "ingest_chunk", "top_k", "max_upload_bytes", "poison_limit",
             "stale_after_seconds", "sweep_interval_seconds", "reprocess_limit",
             "reprocess_max_attempts", "webhook_max_attempts", "max_image_pixels",
             "text_max_chars", "train_epochs", "default_page_size", "max_page_size",
             "audio_max_seconds", "image_batch_size", "text_batch_size", "audio_batch_size",
             "prefetch_items", "max_archive_members", "max_member_bytes", "max_unpacked_bytes",
             "decode_timeout_seconds", "search_port", "search_threads", "index_exact_limit",
             "index_merge_segments", "upload_expire_hours", "dispatch_window", "video_frames",
             "video_max_seconds", "video_max_pixels")
_CHOICES = {"precision": ("auto", "fp32", "bf16"), "audio_too_long": ("cut", "fail"),
            "video_too_long": ("cut", "fail"),
            "decode_isolation": ("process", "off")}


def _parse(name: str, type_name: object, raw: str) -> object:
    kind = str(type_name)
    try:
        if kind.startswith("Path"):
            return Path(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as exc:
        raise SettingsError(f"{PREFIX}{name.upper()}={raw!r}: {exc}") from exc
    return raw
