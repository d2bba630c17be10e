"""One batch of a job, top to bottom: admit (the poison-item guard), read, encode, classify,
commit.

The database session is closed while models run: read inputs, close, compute, open, write.
Encoder outputs are cached by (content hash, encoder version), so only files never seen before
are decoded and encoded. A task turns ids into ``BatchProcessor(rt, job_id, ids).run()`` and
sends what the report asks for (the halves of a split batch, the training, the webhooks).

Poison items: a batch whose worker died (crash, kill, time limit) is delivered again, because
tasks are acknowledged late and rejected on worker loss. Each delivery counts an attempt on the
batch's pending items first; a batch delivered again is split in halves, so the item that kills
workers ends up alone, and once alone past ``MMBATCH_POISON_LIMIT`` deliveries it is marked
failed with the reason while the rest of the job goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
from PIL import Image

from media.decode import read_text
from mmbatch.contract import (
    AUDIO_SOURCE_VIDEO,
    DEFAULT_STRATEGY,
    MODALITIES,
    STEP_TASKS,
    TRAINING_KINDS,
    training_step,
)
from models.align import embed_items, item_vector
from models.explain import explain
from models.families import BY_COLUMN, FAMILIES, Family, dense
from models.registry import SPECS
from models.spec import Encoder
from models.training import predict, stack_features
from models.video import frame_version, pool_frames
from store import features as feature_cache
from store import jobs
from store import search as search_store
from store.registry import ModelRow, get_model
from store.schema import NO_MODEL
from worker.encoding import READY, WHOLE, MediaRef, Part, Parts, encode_media
from worker.frame_index import (
    Frames,
    IndexEntry,
    IndexVectors,
    cached_frames,
    index_vectors,
)
from worker.model_cache import ModelCache, models_of
from worker.runtime import Runtime
from worker.shift import record_job_shift
from worker.vector_index import segment_bytes

log = logging.getLogger(__name__)

# The order an item's modalities are checked in: the first that failed is the item's error (a
# clip's own error says more than its sound track's).
ERROR_ORDER = tuple(sorted(MODALITIES, key=lambda m: m == "audio"))


@dataclass(frozen=True)
class BatchReport:
    new_done: int = 0
    new_failed: int = 0
    completed: bool = False  # this batch brought done + failed to total
    next_step: str | None = None  # "train"/"align": this batch finished a job's extraction
    resend: list[list[int]] = field(default_factory=list)  # a redelivered batch, split
    merge_index: int | None = None  # an index whose appended segments are due for a merge


@dataclass
class Batch:
    """What a batch works on: the job's kind, its items, the model that classifies them, and
    the feature families to compute and cache beside the encoders (a stacked model's, or every
    family for a train job that stacks)."""

    kind: str
    items: list[jobs.ItemRow]
    model: ModelRow | None
    families: tuple[Family, ...] = ()
    # what follows the batches: "train"/"align" (their batches only extract features), None
    then: str | None = None
    walking: bool = False  # read while the job's archive was still being walked


def read_same(s: Any, batch: Batch, outcomes: Sequence[jobs.ItemOutcome]
              ) -> list[jobs.ItemOutcome]:
    """The outcomes of a batch read while its job was being walked, for the items whose files
    are still those it read: an item that gained a file meanwhile (a tar's late member) is
    processed again, and a result from fewer files must not take its place."""
    if not batch.walking:
        return list(outcomes)
    read = {it.id: it for it in batch.items}
    now = {i: jobs.media_files(m) for i, m in
           jobs.current_media(s, [o.item_id for o in outcomes]).items()}
    return [o for o in outcomes if o.item_id in now
            and now[o.item_id] == read[o.item_id].media]


class BatchProcessor:
    def __init__(self, rt: Runtime, job_id: str, item_ids: Sequence[int]) -> None:
        self.rt = rt
        self.job_id = job_id
        self.item_ids = list(item_ids)
        self.models: ModelCache = models_of(rt)
        self.indexed: IndexVectors | None = None  # an aligner batch's index vectors

    def run(self) -> BatchReport:
        started = time.perf_counter()
        admitted = self.admit()
        if isinstance(admitted, BatchReport):
            return admitted
        batch = self.read(admitted)
        if batch is None:
            return BatchReport()
        mismatch = self.models.mismatch(batch.model) if batch.model else None
        if mismatch:
            return fail_batch(self.rt, self.job_id, [it.id for it in batch.items], mismatch)
        features, errors = self.encode(batch)
        outcomes = self.outcomes(batch, features, errors)
        segment = (self.segment(batch)
                   if batch.model is not None and batch.model.kind == "aligner" else None)
        with self.rt.db.session() as s:
            report = commit(s, self.job_id, batch.kind, batch.then, read_same(s, batch, outcomes),
                            batch.model.id if batch.model and not batch.then else NO_MODEL)
            if segment is not None and batch.model is not None:
                report = self.append(s, batch.model, *segment, report)
        self.rt.metrics.items(batch.kind, report.new_done, report.new_failed)
        self.rt.metrics.batch(batch.kind, time.perf_counter() - started)
        if report.completed and batch.model is not None and not batch.then:
            self.record_shift(batch.model)
        return report

    def admit(self) -> list[int] | BatchReport:
        """The poison-item guard: count this delivery of the batch's pending items; the ids to
        process now, or what to do instead (split a redelivered batch, fail a lone item that
        has killed workers too often, nothing when the job stopped or the batch is done)."""
        with self.rt.db.session() as s:
            job = jobs.get_job(s, self.job_id)
            if job.state != "running":
                return BatchReport()
            ids = jobs.pending_among(s, job, self.item_ids)
            if not ids:
                return BatchReport()
            deliveries = jobs.add_delivery(s, ids)
            if deliveries > 1 and len(ids) > 1:
                log.warning("batch_split job=%s items=%d deliveries=%d", self.job_id, len(ids),
                            deliveries)
                jobs.reset_deliveries(s, ids)  # each half starts counting afresh
                half = len(ids) // 2
                return BatchReport(resend=[ids[:half], ids[half:]])
        if deliveries > self.rt.settings.poison_limit:
            log.warning("poison_item job=%s item=%s deliveries=%d", self.job_id, ids[0],
                        deliveries)
            return fail_batch(self.rt, self.job_id, ids,
                              f"the worker processing this item crashed or timed out "
                              f"{deliveries - 1} times; giving up")
        return ids

    def read(self, ids: list[int]) -> Batch | None:
        with self.rt.db.session() as s:
            job = jobs.get_job(s, self.job_id)
            if job.state != "running":
                log.info("batch_skipped job=%s state=%s items=%d", self.job_id, job.state,
                         len(ids))
                return None
            model = None
            families: tuple[Family, ...] = ()
            if job.model_version_id is not None and job.kind not in TRAINING_KINDS:
                model = ModelRow.of(get_model(s, job.model_version_id))
                families = tuple(BY_COLUMN[c] for c, e in model.encoders.items()
                                 if e.get("mode") == "family" and c in BY_COLUMN)
            elif job.kind == "train" and ((job.options or {}).get("strategy")
                                          or DEFAULT_STRATEGY) == "stack":
                families = FAMILIES
            return Batch(job.kind, jobs.batch_items(s, job, ids), model, families,
                         training_step(job.kind, job.options), job.walking)

    def encode(self, batch: Batch) -> tuple[dict[int, dict[str, np.ndarray]], dict[int, str]]:
        """Per item, the features of each modality present, or the error that failed it.

        One cache read for all modalities; the misses of all modalities are decoded ahead of the
        encoders (worker.encoding) and the new features written in one transaction. An item
        fails with the error of its first modality (image, text, video, audio: a clip's own
        error before its sound track's) that cannot be decoded. A model trained with scratch or finetuned encoders brings its own for those
        modalities, cached under their own versions. A clip's frames go through the frozen
        image encoder and pool into its ``video`` features (models.video); what a clip lacks
        (no sound track, no pictures in an audio-only file) leaves its item without that
        modality when the item has another (``absent``).
        """
        own = self.models.own_encoders(batch.model) if batch.model is not None else {}
        versions = {m: own[m].spec.version if m in own else SPECS[m].version for m in MODALITIES}
        wanted = {m: {it.id: it.media[m] for it in batch.items if m in it.media}
                  for m in MODALITIES}
        with self.rt.db.session() as s:
            cached = {m: feature_cache.get_features(s, versions[m],
                                                    {f.blob for f in files.values()})
                      for m, files in wanted.items() if files}
            known = {fam.column: feature_cache.get_features(
                         s, fam.version, {f.blob for f in wanted[fam.modality].values()})
                     for fam in batch.families if wanted.get(fam.modality)}
        # a file is read when its encoder's features or one of its families' are not cached;
        # audio from a clip's sound track takes the "track" decoder
        missing = []
        for m in MODALITIES:
            for f in wanted[m].values():
                columns = tuple(fam.column for fam in batch.families
                                if fam.modality == m and f.blob not in known[fam.column])
                new_vector = f.blob not in cached.get(m, {})
                if new_vector or columns:
                    missing.append(MediaRef(m, f.blob, f.name,
                                            "track" if f.source == AUDIO_SOURCE_VIDEO else m,
                                            columns, new_vector))
        fresh, failed, absent, frames, ready = self.encode_files(missing, own)
        if fresh or frames or ready:
            with self.rt.db.session() as s:
                for m in MODALITIES:
                    new = {blob: vec for (modality, blob), vec in fresh.items() if modality == m}
                    if new:
                        feature_cache.put_features(s, versions[m], new)
                for version, vectors in frames.items():
                    feature_cache.put_features(s, version, vectors)
                for fam in batch.families:
                    new = {blob: got[fam.column] for (modality, blob), got in ready.items()
                           if fam.column in got}
                    if new:
                        feature_cache.put_features(s, fam.version, new)
                        known[fam.column].update(new)
        features: dict[int, dict[str, np.ndarray]] = {}
        errors: dict[int, str] = {}
        for m in ERROR_ORDER:
            for item_id, f in wanted[m].items():
                if item_id in errors:
                    continue
                if (m, f.blob) in failed:
                    if (m, f.blob) in absent and len(wanted_of(wanted, item_id)) > 1:
                        continue  # the clip lacks it; the item has something else
                    errors[item_id] = failed[(m, f.blob)]
                    features.pop(item_id, None)
                else:
                    vec = cached[m].get(f.blob) if m in cached else None
                    features.setdefault(item_id, {})[m] = (vec if vec is not None
                                                           else fresh[(m, f.blob)])
        # the families a model takes, as its columns' inputs (a sparse family expanded)
        takes = set(batch.model.encoders) if batch.model is not None else set()
        for fam in batch.families:
            if fam.column not in takes:
                continue
            for item_id, f in wanted[fam.modality].items():
                vec = known[fam.column].get(f.blob)
                if item_id in features and fam.modality in features[item_id] and vec is not None:
                    features[item_id][fam.column] = dense(fam, vec)
        for it in batch.items:
            if it.id not in errors and it.id not in features:
                # every modality the item had was absent from its clip: the first one's reason
                errors[it.id] = next(failed[(m, it.media[m].blob)] for m in ERROR_ORDER
                                     if m in it.media)
        log.info("encode items=%d cache_hits=%d encoded=%d failed=%d", len(batch.items),
                 sum(len(c) for c in cached.values()), len(fresh), len(failed))
        return features, errors

    def encode_files(self, refs: Sequence[MediaRef], own: dict[str, Encoder]
                     ) -> tuple[dict[tuple[str, str], np.ndarray], dict[tuple[str, str], str],
                                set[tuple[str, str]], dict[str, dict[str, np.ndarray]],
                                dict[tuple[str, str], dict[str, np.ndarray]]]:
        """Read, decode and preprocess in the decode threads, ahead of the encoders, which take
        each modality in chunks of its batch size; (modality, blob) -> features, or -> error,
        the errors that say a clip lacks a stream, each clip frame's features by cache key
        (models.video.frame_version) and clip, and (modality, blob) -> {column: features} of
        the feature families each ref asked for (computed in the decode threads from the same
        decoded file). ``own``: a model's own encoders, used instead of the frozen ones for
        their modality; a clip's frames always take the frozen image encoder (a video's
        features are frozen)."""
        if not refs:
            return {}, {}, set(), {}, {}
        # "track": audio read from a clip's sound track
        decoders = {m: self.models.decoder(m) for m in {ref.decoder or ref.modality for ref in refs}}
        # loaded here, in the model thread
        encoders: dict[str, Encoder] = {}
        for m in decoders:
            m = "audio" if m == "track" else m
            if m != "video" and m not in encoders:
                encoders[m] = own[m] if m in own else self.models.encoder(m)
        frame_encoder = "frame" if "image" in own else "image"
        if "video" in decoders:
            encoders[frame_encoder] = self.models.encoder("image")

        def prepare(ref: MediaRef) -> Any:
            raw = decoders[ref.decoder or ref.modality](self.rt.blobs.read(ref.blob), ref.name)
            if ref.modality == "video":
                image_encoder = encoders[frame_encoder]
                return Parts(tuple(Part(frame_encoder, f.time,
                                        image_encoder.preprocess(Image.fromarray(f.rgb)))
                                   for f in raw.frames))
            whole = encoders[ref.modality].preprocess(raw) if ref.encode else None
            if not ref.families:
                return whole
            return Parts(((Part(ref.modality, WHOLE, whole),) if ref.encode else ())
                         + family_parts(ref, raw))

        result = encode_media(refs, prepare=prepare, encoder=encoders.__getitem__,
                              batch_sizes=self.models.batch_sizes, pool=self.models.pool,
                              depth=self.rt.settings.prefetch_items,
                              observe=self.rt.metrics.encoder_batch)
        log.info("encoders files=%d model_s=%.3f decode_wait_s=%.3f", len(refs),
                 result.model_seconds, result.wait_seconds)
        vectors, errors = dict(result.vectors), dict(result.errors)
        frames: dict[str, dict[str, np.ndarray]] = {}
        for (modality, blob), parts in result.parts.items():
            for seconds, vec in parts:
                frames.setdefault(frame_version(seconds), {})[blob] = vec
            if parts:
                vectors[(modality, blob)] = pool_frames(np.stack([v for _, v in parts]))
            else:  # an audio-only file
                name = next(r.name for r in refs if (r.modality, r.blob) == (modality, blob))
                errors[(modality, blob)] = (f"video {name}: no video stream (an audio-only "
                                            "file)")
                result.absent.add((modality, blob))
        return vectors, errors, result.absent, frames, result.ready

    def outcomes(self, batch: Batch, features: dict[int, dict[str, np.ndarray]],
                 errors: dict[int, str]) -> list[jobs.ItemOutcome]:
        outcomes = [jobs.ItemOutcome(it.id, error=errors[it.id])
                    for it in batch.items if it.id in errors]
        ok = [it for it in batch.items if it.id not in errors]
        if not ok:
            return outcomes
        info = {it.id: self.item_info(it, features[it.id]) for it in ok}
        if batch.then:  # features only: a training (or an adaptation) follows
            return outcomes + [jobs.ItemOutcome(it.id, label=it.label, info=info.get(it.id))
                               for it in ok]
        feats = [features[it.id] for it in ok]
        if batch.model is None:
            return outcomes + [jobs.ItemOutcome(it.id, embedding=plain_embedding(f),
                                                info=info.get(it.id))
                               for it, f in zip(ok, feats)]
        model = batch.model
        if model.kind == "aligner":
            aligned = embed_items(self.models.aligner(model), feats)
            self.indexed = built = self.index_vectors(model, ok, aligned)
            return outcomes + [jobs.ItemOutcome(it.id, embedding=item_vector(
                                   built.item_vectors(it.id, v)), info=info.get(it.id))
                               for it, v in zip(ok, aligned, strict=True)]
        probs, fused, notes = classify(self.models, model, feats, explained=True)
        top_k = self.rt.settings.top_k
        for it, p, f, note in zip(ok, probs, fused, notes):
            order = np.argsort(-p)[:top_k]
            outcomes.append(jobs.ItemOutcome(
                it.id, label=model.classes[order[0]], confidence=float(p[order[0]]),
                top_k=[{"label": model.classes[i], "probability": round(float(p[i]), 6)}
                       for i in order],
                embedding=f, explanation=note, info=info.get(it.id)))
        return outcomes

    def item_info(self, item: jobs.ItemRow, feats: dict[str, np.ndarray]
                  ) -> dict[str, Any] | None:
        """How the item's media were read, where a cached feature says nothing of it: how its
        caption was read (its encoding, and whether the limit cut it; reading a caption again
        costs microseconds), where its audio came from when its clip's sound track gave it, and
        the modalities its clip lacked (no sound track; no pictures in an audio-only file)."""
        info: dict[str, Any] = {}
        if "text" in item.media:
            f = item.media["text"]
            text = read_text(self.rt.blobs.read(f.blob), f.name, self.rt.settings.text_max_chars)
            info.update(text_encoding=text.encoding, text_truncated=text.truncated)
        audio = item.media.get("audio")
        if audio is not None and audio.source == AUDIO_SOURCE_VIDEO and "audio" in feats:
            info["audio_source"] = AUDIO_SOURCE_VIDEO
        for m in MODALITIES:
            if m in item.media and m not in feats:
                info.setdefault("absent", []).append(m)
        return info or None

    def index_vectors(self, model: ModelRow, ok: Sequence[jobs.ItemRow],
                      aligned: Sequence[dict[str, np.ndarray]]) -> IndexVectors:
        """An aligner batch's index vectors: its items' aligned vectors, a clip's frames each
        with its time (worker.frame_index, from the frame features ``encode`` cached)."""
        entries = [IndexEntry(it.id, v, it.media["video"].blob if "video" in it.media else None)
                   for it, v in zip(ok, aligned, strict=True)]
        frames: dict[str, Frames] = {}
        if any(e.clip for e in entries):
            with self.rt.db.session() as s:
                frames = cached_frames(s, [e.clip for e in entries if e.clip])
        built = index_vectors(self.models.aligner(model), entries, frames)
        if built.missing:
            log.warning("frames_missing job=%s clips=%d", self.job_id, built.missing)
        return built

    def segment(self, batch: Batch) -> tuple[str, int] | None:
        """An aligner's batch: its index vectors (``index_vectors``) as a segment blob (written
        before the results commit; the same vectors make the same blob, so a batch delivered
        twice appends nothing twice), and how many vectors it holds."""
        if batch.model is None or batch.model.kind != "aligner" or self.indexed is None \
                or not self.indexed.arrays:
            return None
        rows = sum(len(v[0]) for v in self.indexed.arrays.values())
        return self.rt.blobs.put_bytes(segment_bytes(self.indexed.arrays)), rows

    def append(self, s: Any, model: ModelRow, blob: str, rows: int, report: BatchReport
               ) -> BatchReport:
        """Append the segment to the aligner's index, in the results' transaction; ask for a
        merge once enough segments wait."""
        index_id = search_store.ensure_index(s, model.id, model.tenant_id)
        search_store.add_segment(s, index_id, blob, rows)
        if len(search_store.unmerged(s, index_id)) >= self.rt.settings.index_merge_segments:
            return replace(report, merge_index=index_id)
        return report

    def record_shift(self, model: ModelRow) -> None:
        """The finished job's shift report (worker.shift); the job itself has succeeded
        already, so a failure here is logged with its traceback, not raised into a
        redelivery."""
        try:
            record_job_shift(self.rt, self.job_id, model)
        except Exception:
            log.exception("shift_report_failed job=%s model=%s", self.job_id, model.id)


def family_parts(ref: MediaRef, raw: Any) -> tuple[Part, ...]:
    """The feature families ``ref`` asked for, from its decoded file. A family that fails on a
    file is logged and left out (the item goes on without that column, as without a modality);
    the file's own encoder decides whether it is readable."""
    out = []
    for column in ref.families:
        try:
            out.append(Part(READY, column, BY_COLUMN[column].features(raw)))
        except Exception:  # noqa: BLE001 - one family's bug must not fail the file
            log.exception("family_failed column=%s name=%s", column, ref.name)
    return tuple(out)


def wanted_of(wanted: dict[str, dict[int, jobs.MediaFile]], item_id: int) -> list[str]:
    """The modalities an item has files (or a clip's streams) for."""
    return [m for m, files in wanted.items() if item_id in files]


def classify(models: ModelCache, model: ModelRow, feats: Sequence[dict[str, np.ndarray]],
             explained: bool = False
             ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Class probabilities (N, C) and fused embeddings (N, F) for items given their
    per-modality features, at the model's temperature; with ``explained``, per item each
    present modality's weight (where the strategy has one) and the change in the predicted
    class's probability without it (models.explain)."""
    net = models.classifier(model)
    tensors, mask = stack_features(net.cfg.input_dims, feats)
    temperature = float(model.config.get("temperature", 1.0))
    device = models.device
    probs, fused = predict(net, {m: t.to(device) for m, t in tensors.items()}, mask.to(device),
                           temperature=temperature)
    notes = explain(net, tensors, mask, temperature=temperature) if explained else []
    return probs.numpy(), fused.numpy(), notes


def plain_embedding(feats: dict[str, np.ndarray]) -> np.ndarray:
    """With no trained fusion: each modality L2-normalised, concatenated, zeros where missing."""
    parts = []
    for modality in MODALITIES:
        vec = feats.get(modality)
        if vec is None:
            parts.append(np.zeros(SPECS[modality].dim, dtype="<f4"))
        else:
            parts.append((vec / max(float(np.linalg.norm(vec)), 1e-12)).astype("<f4"))
    return np.concatenate(parts)


def commit(s: Any, job_id: str, kind: str, then: str | None,
           outcomes: Sequence[jobs.ItemOutcome], model_version_id: int) -> BatchReport:
    """Write outcomes and counters; the batch that completes the job finishes it, or moves it
    on to the step ``then`` names (training: a train job's, an adapting classify job's)."""
    written = jobs.record_outcomes(s, job_id, model_version_id, outcomes,
                                   replace_failed=kind == "reprocess")
    moved = jobs.move_on(s, job_id, then) if written.completed else None
    return BatchReport(written.new_done, written.new_failed, written.completed,
                       moved if moved in STEP_TASKS else None)


def fail_batch(rt: Runtime, job_id: str, item_ids: Sequence[int], error: str) -> BatchReport:
    """Record every item of a batch that could not be processed as failed, with the reason."""
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        if job.state != "running":
            return BatchReport()
        kind = job.kind
        report = commit(s, job_id, kind, training_step(kind, job.options),
                        [jobs.ItemOutcome(i, error=error) for i in item_ids],
                        jobs.result_model(job))
    rt.metrics.items(kind, report.new_done, report.new_failed)
    return report
