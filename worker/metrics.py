"""Prometheus metrics of a worker process: what it counts, and what it reads when scraped.

What a worker counts (``WorkerMetrics``, one per process, on the process's ``Runtime``): items
finished and failed, the time of each batch task, the time of each encoder forward pass by
modality; read when scraped: each encoder's load time, and the depth of the broker's queues.
``worker.metrics_server`` serves them on ``MMBATCH_WORKER_METRICS_PORT``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from kombu.exceptions import ChannelError
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Seconds: encoder passes take milliseconds on a GPU to seconds on a CPU; batches up to minutes.
ENCODER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.items_processed = Counter(
            "mmbatch_worker_items_processed", "Items given a result, by job kind",
            ["kind"], registry=self.registry)
        self.items_failed = Counter(
            "mmbatch_worker_items_failed", "Items that failed (an error result), by job kind",
            ["kind"], registry=self.registry)
        self.batch_seconds = Histogram(
            "mmbatch_worker_batch_seconds",
            "One batch: read, decode, encode, fuse, classify and write, by job kind",
            ["kind"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.encoder_seconds = Histogram(
            "mmbatch_worker_encoder_batch_seconds",
            "One encoder forward pass over a chunk of a batch, by modality",
            ["modality"], buckets=ENCODER_BUCKETS, registry=self.registry)
        self.encoder_items = Counter(
            "mmbatch_worker_encoded_items", "Files run through an encoder, by modality",
            ["modality"], registry=self.registry)

    def items(self, kind: str, done: int, failed: int) -> None:
        if done:
            self.items_processed.labels(kind).inc(done)
        if failed:
            self.items_failed.labels(kind).inc(failed)

    def batch(self, kind: str, seconds: float) -> None:
        self.batch_seconds.labels(kind).observe(seconds)

    def encoder_batch(self, modality: str, items: int, seconds: float) -> None:
        self.encoder_seconds.labels(modality).observe(seconds)
        self.encoder_items.labels(modality).inc(items)


class ModelLoadCollector(Collector):
    """Seconds each encoder took to load in this process (``ModelCache.load_seconds`` of the
    runtime's model cache; none before a model task ran)."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def collect(self) -> Iterable[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("mmbatch_worker_model_load_seconds",
                                  "Seconds the encoder of a modality took to load",
                                  labels=["modality"])
        models = self.runtime.models
        loaded = dict(models.load_seconds) if models is not None else {}
        for modality, seconds in sorted(loaded.items()):
            gauge.add_metric([modality], seconds)
        yield gauge


class QueueDepthCollector(Collector):
    """Messages waiting in the broker, per queue, asked of the broker at each scrape.

    Every worker reports the same broker-wide numbers: aggregate with ``max``, not ``sum``.
    """

    def __init__(self, app: Any, queues: Iterable[str]) -> None:
        self.app = app
        self.queues = list(queues)

    def depths(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with self.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.default_channel
            # kombu's virtual transports (Redis, SQLAlchemy) count a queue with _size; their
            # passive queue_declare first asks whether the queue exists, which the Redis
            # transport answers wrongly under global_keyprefix (MMBATCH_BROKER_PREFIX).
            size = getattr(channel, "_size", None)
            for queue in self.queues:
                try:
                    out[queue] = int(size(queue) if size is not None else
                                     channel.queue_declare(queue=queue, passive=True)
                                     .message_count)
                except ChannelError:  # an AMQP queue never declared: nothing waits in it
                    out[queue] = 0
        return out

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("mmbatch_queue_depth", "Messages waiting in the broker",
                                  labels=["queue"])
        up = GaugeMetricFamily("mmbatch_broker_up", "1 if the broker answered this scrape")
        try:
            depths = self.depths()
        except Exception as exc:  # noqa: BLE001  # a scrape answers even without the broker
            log.warning("queue_depth_unavailable error=%s", exc)
            up.add_metric([], 0)
        else:
            for queue, depth in depths.items():
                gauge.add_metric([queue], depth)
            up.add_metric([], 1)
        yield gauge
        yield up
