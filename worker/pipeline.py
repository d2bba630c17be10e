"""Process one batch: decode, encode each modality over the whole batch, fuse, classify, write.

The database session is closed while models run: read inputs, close, compute, open, write.
Encoder outputs are cached by (content hash, encoder version), so only files never seen before
are decoded and encoded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from store import features as feature_cache
from store import jobs
from store.registry import get_model
from store.schema import NO_MODEL
from worker import media
from worker.encoding import MediaRef, encode_media
from worker.runtime import Runtime

log = logging.getLogger(__name__)

MODALITIES = ("image", "text", "audio")


@dataclass
class BatchInput:
    job_id: str
    kind: str
    items: list[dict[str, Any]]  # id, key, media, label
    model: dict[str, Any] | None  # id, checkpoint_blob, config, classes


@dataclass
class Encoded:
    """Per item: the features of each modality present, or the error that failed it."""

    features: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchReport:
    new_done: int
    new_failed: int
    completed: bool
    next_step: str | None  # "train" when this batch finished a train job's extraction


def process_batch(rt: Runtime, job_id: str, item_ids: Sequence[int]) -> BatchReport:
    started = time.perf_counter()
    batch = _read(rt, job_id, item_ids)
    if batch is None:
        return BatchReport(0, 0, False, None)
    mismatch = encoder_mismatch(rt, batch.model) if batch.model else None
    if mismatch:
        return fail_batch(rt, job_id, [it["id"] for it in batch.items], mismatch)
    encoded = encode_items(rt, batch.items, batch.model)
    outcomes = _outcomes(rt, batch, encoded)
    model_version_id = batch.model["id"] if batch.model else NO_MODEL
    with rt.db.session() as s:
        report = _commit(s, job_id, batch.kind, model_version_id, outcomes)
    rt.metrics.items(batch.kind, report.new_done, report.new_failed)
    rt.metrics.batch(batch.kind, time.perf_counter() - started)
    if report.completed and batch.model is not None:
        _record_shift(rt, job_id, batch.model)
    return report


def _record_shift(rt: Runtime, job_id: str, model: dict[str, Any]) -> None:
    """The finished job's shift report (worker.shift); the job itself has succeeded already, so
    a failure here is logged with its traceback, not raised into a redelivery."""
    from worker.shift import record_job_shift

    try:
        record_job_shift(rt, job_id, model)
    except Exception:
        log.exception("shift_report_failed job=%s model=%s", job_id, model["id"])


def _commit(s: Any, job_id: str, kind: str, model_version_id: int,
            outcomes: Sequence[jobs.ItemOutcome]) -> BatchReport:
    """Write outcomes and counters; the batch that completes the job finishes it."""
    commit = jobs.record_outcomes(s, job_id, model_version_id, outcomes,
                                  replace_failed=kind == "reprocess")
    next_step = None
    if commit.completed:
        if kind == "train":
            if jobs.enter_stage(s, job_id, "extracting", "training"):
                next_step = "train"
        else:
            jobs.finish_job(s, job_id)
    return BatchReport(commit.new_done, commit.new_failed, commit.completed, next_step)


def _read(rt: Runtime, job_id: str, item_ids: Sequence[int]) -> BatchInput | None:
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        if job.state != "running":
            log.info("batch_skipped job=%s state=%s items=%d", job_id, job.state, len(item_ids))
            return None
        items = [{"id": it.id, "key": it.key, "media": it.media, "label": it.label}
                 for it in jobs.items_by_id(s, jobs.belongs(s, job, item_ids))]
        model = None
        if job.model_version_id is not None and job.kind != "train":
            m = get_model(s, job.model_version_id)
            model = {"id": m.id, "checkpoint_blob": m.checkpoint_blob, "config": m.config,
                     "classes": list(m.classes), "encoders": dict(m.encoders)}
        return BatchInput(job_id, job.kind, items, model)


def encoder_mismatch(rt: Runtime, model: dict[str, Any]) -> str | None:
    """Why this worker's encoders cannot feed a model trained on other encoder versions, if so."""
    for modality, trained in sorted(model["encoders"].items()):
        if trained.get("mode") == "scratch":
            continue  # the model's own encoder (worker.adaptation), shipped with it
        if trained.get("mode") == "finetune":
            # Its own top over this worker's pretrained bottom: the bottom must be the same.
            from models.registry import SPECS

            if trained.get("base_version") != SPECS[modality].version:
                return (f"model {model['id']} finetuned {modality} encoder "
                        f"{trained.get('base_version')!r}; this worker has "
                        f"{SPECS[modality].version!r}: retrain the model")
            continue
        current = rt.encoder(modality).spec.version
        if trained.get("version") != current:
            return (f"model {model['id']} was trained on {modality} encoder "
                    f"{trained.get('version')!r}; this worker has {current!r}: retrain the model")
    return None


def encode_items(rt: Runtime, items: Sequence[dict[str, Any]],
                 model: dict[str, Any] | None = None) -> Encoded:
    """Features for every present modality of every item, from the cache or the encoders.

    One cache read for all modalities; the misses of all modalities are decoded ahead of the
    encoders (worker.encoding) and the new features written in one transaction. An item fails
    with the error of its first modality (image, text, audio) that cannot be decoded. A model
    trained with scratch or finetuned encoders brings its own for those modalities, cached
    under their own versions.
    """
    from models.registry import SPECS
    from worker.adaptation import own_encoders

    own = own_encoders(rt, model) if model is not None else {}
    wanted = {m: {it["id"]: it["media"][m] for it in items if m in it["media"]}
              for m in MODALITIES}
    versions = {m: own[m].spec.version if m in own else SPECS[m].version for m in MODALITIES}
    with rt.db.session() as s:
        cached = {m: feature_cache.get_features(s, versions[m],
                                                {ref["blob"] for ref in refs.values()})
                  for m, refs in wanted.items() if refs}
    missing = [MediaRef(m, ref["blob"], ref["name"]) for m in MODALITIES
               for ref in wanted[m].values() if ref["blob"] not in cached.get(m, {})]
    fresh, errors = _encode_blobs(rt, missing, own)
    if fresh:
        with rt.db.session() as s:
            for m in MODALITIES:
                new = {blob: vec for (modality, blob), vec in fresh.items() if modality == m}
                if new:
                    feature_cache.put_features(s, versions[m], new)
    out = Encoded()
    for m in MODALITIES:
        for item_id, ref in wanted[m].items():
            if item_id in out.errors:
                continue
            key = (m, ref["blob"])
            if key in errors:
                out.errors[item_id] = errors[key]
                out.features.pop(item_id, None)
            else:
                vec = cached[m][ref["blob"]] if ref["blob"] in cached.get(m, {}) else fresh[key]
                out.features.setdefault(item_id, {})[m] = vec
    hits = sum(len(c) for c in cached.values())
    log.info("encode items=%d cache_hits=%d encoded=%d failed=%d", len(items), hits,
             len(fresh), len(errors))
    return out


def _encode_blobs(rt: Runtime, refs: Sequence[MediaRef], own: dict[str, Any] | None = None
                  ) -> tuple[dict[tuple[str, str], np.ndarray], dict[tuple[str, str], str]]:
    """Read, decode and preprocess in the decode threads, ahead of the encoders, which take
    each modality in chunks of its batch size; (modality, blob) -> features, or -> error.
    ``own``: a model's own encoders, used instead of the frozen ones for their modality."""
    if not refs:
        return {}, {}
    own = own or {}
    decoders = {m: _decoder(rt, m) for m in {ref.modality for ref in refs}}
    # loaded here, in the model thread
    encoders = {m: own[m] if m in own else rt.encoder(m) for m in decoders}

    def prepare(ref: MediaRef) -> Any:
        raw = decoders[ref.modality](rt.blobs.read(ref.blob), ref.name)
        return encoders[ref.modality].preprocess(raw)

    result = encode_media(refs, prepare=prepare, encoder=encoders.__getitem__,
                          batch_sizes=rt.batch_sizes, pool=rt.pool,
                          depth=rt.settings.prefetch_items, observe=rt.metrics.encoder_batch)
    log.info("encoders files=%d model_s=%.3f decode_wait_s=%.3f", len(refs),
             result.model_seconds, result.wait_seconds)
    return result.vectors, result.errors


def _decoder(rt: Runtime, modality: str) -> Callable[[bytes, str], Any]:
    """One modality's decode function: images and audio in the decode sandbox's child
    processes unless isolation is off; text in-process (pure Python, bounded)."""
    s = rt.settings
    if modality == "text":
        return lambda data, name: media.decode_text(data, name, max_chars=s.text_max_chars)
    decoders: Any = rt.sandbox or media
    if modality == "image":
        return lambda data, name: decoders.decode_image(data, name, max_pixels=s.max_image_pixels)
    return lambda data, name: decoders.decode_audio(data, name, max_seconds=s.audio_max_seconds,
                                                    too_long=s.audio_too_long)


def _outcomes(rt: Runtime, batch: BatchInput, encoded: Encoded) -> list[jobs.ItemOutcome]:
    outcomes = [jobs.ItemOutcome(it["id"], error=encoded.errors[it["id"]])
                for it in batch.items if it["id"] in encoded.errors]
    ok = [it for it in batch.items if it["id"] not in encoded.errors]
    if not ok:
        return outcomes
    if batch.kind == "train":
        outcomes += [jobs.ItemOutcome(it["id"], label=it["label"]) for it in ok]
        return outcomes
    feats = [encoded.features[it["id"]] for it in ok]
    if batch.model is None:
        outcomes += [jobs.ItemOutcome(it["id"], embedding=plain_embedding(rt, f))
                     for it, f in zip(ok, feats)]
        return outcomes
    predictions = classify(rt, batch.model, feats)
    notes = explain_items(rt, batch.model, feats)
    for it, (probs, fused), note in zip(ok, predictions, notes):
        order = np.argsort(-probs)[: rt.settings.top_k]
        classes = batch.model["classes"]
        outcomes.append(jobs.ItemOutcome(
            it["id"], label=classes[order[0]], confidence=float(probs[order[0]]),
            top_k=[{"label": classes[i], "probability": round(float(probs[i]), 6)}
                   for i in order],
            embedding=fused, explanation=note))
    return outcomes


def plain_embedding(rt: Runtime, feats: dict[str, np.ndarray]) -> np.ndarray:
    """With no trained fusion: each modality L2-normalised, concatenated, zeros where missing."""
    parts = []
    for modality in MODALITIES:
        dim = rt.encoder(modality).spec.dim
        vec = feats.get(modality)
        if vec is None:
            parts.append(np.zeros(dim, dtype="<f4"))
        else:
            parts.append((vec / max(float(np.linalg.norm(vec)), 1e-12)).astype("<f4"))
    return np.concatenate(parts)


def classify(rt: Runtime, model: dict[str, Any], feats: Sequence[dict[str, np.ndarray]]
             ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Class probabilities and fused embeddings for items given their per-modality features."""

    from models.training import predict

    net = rt.classifier(model["id"], model["checkpoint_blob"], model["config"])
    tensors, mask = stack_features(net.cfg.input_dims, feats)
    device = rt.device
    probs, fused = predict(net, {m: t.to(device) for m, t in tensors.items()}, mask.to(device),
                           temperature=float(model["config"].get("temperature", 1.0)))
    return list(zip(probs.cpu().numpy(), fused.cpu().numpy()))


def explain_items(rt: Runtime, model: dict[str, Any], feats: Sequence[dict[str, np.ndarray]]
                  ) -> list[dict[str, Any]]:
    """Per item, each present modality's weight (where the strategy has one) and the change in
    the predicted class's probability without it (models.explain)."""
    from models.explain import explain

    net = rt.classifier(model["id"], model["checkpoint_blob"], model["config"])
    tensors, mask = stack_features(net.cfg.input_dims, feats)
    return explain(net, tensors, mask, temperature=float(model["config"].get("temperature", 1.0)))


def stack_features(input_dims: dict[str, int], feats: Sequence[dict[str, np.ndarray]]
                   ) -> tuple[dict[str, Any], Any]:
    """Per-modality (N, D) tensors with zeros where missing, and the (N, M) presence mask."""
    import torch

    n = len(feats)
    tensors = {m: torch.zeros(n, d) for m, d in input_dims.items()}
    mask = torch.zeros(n, len(input_dims), dtype=torch.bool)
    for i, f in enumerate(feats):
        for j, m in enumerate(input_dims):
            if m in f:
                tensors[m][i] = torch.from_numpy(np.asarray(f[m], dtype=np.float32))
                mask[i, j] = True
    return tensors, mask


def fail_batch(rt: Runtime, job_id: str, item_ids: Sequence[int], error: str) -> BatchReport:
    """Record every item of a batch that could not be processed as failed, with the reason."""
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        if job.state != "running":
            return BatchReport(0, 0, False, None)
        kind = job.kind
        model_version_id = jobs.result_model(job)
        outcomes = [jobs.ItemOutcome(i, error=error) for i in item_ids]
        report = _commit(s, job_id, kind, model_version_id, outcomes)
    rt.metrics.items(kind, report.new_done, report.new_failed)
    return report
