"""The shared vocabulary of mmbatch: modalities, job kinds, states and stages, task and queue
names, fusion strategies, losses, encoder modes, and a train job's options.

Defined once, torch-free, and imported everywhere (the API, the worker, the models, the tests and
the OpenAPI document). It imports nothing of the project, so ``models/`` may import it too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# --- media --------------------------------------------------------------------------------------

MODALITIES: tuple[str, ...] = ("image", "text", "audio", "video")
# Modalities whose features come from another modality's frozen encoder: a clip's ``video``
# features are its sampled frames through the image encoder, pooled over time (docs/video.md).
# They have no encoder of their own to finetune or train from scratch: always frozen.
DERIVED_MODALITIES: tuple[str, ...] = ("video",)
# Where an item's audio came from when a clip's sound track gave it (the result's info).
AUDIO_SOURCE_VIDEO = "video"

# --- jobs ---------------------------------------------------------------------------------------

JOB_KINDS: tuple[str, ...] = ("embed", "classify", "train", "align")  # what a client may submit
INTERNAL_KINDS: tuple[str, ...] = ("reprocess",)  # what the service creates itself
ALL_KINDS: tuple[str, ...] = JOB_KINDS + INTERNAL_KINDS
JOB_STATES: tuple[str, ...] = ("queued", "ingesting", "running", "succeeded", "failed",
                               "cancelled")
TERMINAL_STATES: tuple[str, ...] = ("succeeded", "failed", "cancelled")
ACTIVE_STATES: tuple[str, ...] = ("queued", "ingesting", "running")
# Who goes first when workers are shared (worker.dispatch): interactive before normal before
# bulk (reprocess jobs); within one, tenants in turn, then their jobs.
PRIORITIES: tuple[str, ...] = ("interactive", "normal", "bulk")
DEFAULT_PRIORITY = "normal"
# A running train (or align) job extracts features, then trains.
JOB_STAGES: tuple[str, ...] = ("extracting", "training")
# Jobs whose batches only extract features, then a training (or evaluating) step follows.
TRAINING_KINDS: tuple[str, ...] = ("train", "align")


def training_step(kind: str, options: Mapping[str, Any] | None) -> str | None:
    """The step that follows a job's extraction, by the job kind that names its task: "train"
    (train jobs, and classify jobs with ``adapt``: their model is adapted to their own items
    first, models.transduct), "align", or None (the job is done when its batches are)."""
    if kind in TRAINING_KINDS:
        return kind
    if kind == "classify" and (options or {}).get("adapt"):
        return "train"
    return None

# --- tasks and queues ---------------------------------------------------------------------------

INGEST_QUEUE = "ingest"  # archive walking and housekeeping: no model, no torch
MODEL_QUEUE = "model"  # encoders and classifiers over batches
TRAIN_QUEUE = "train"  # training: long, so it never holds the batches' worker

TASK_INGEST = "mmbatch.ingest"
TASK_PROCESS_BATCH = "mmbatch.process_batch"
TASK_TRAIN = "mmbatch.train"
TASK_REPROCESS = "mmbatch.reprocess"
TASK_SWEEP = "mmbatch.sweep"
TASK_WEBHOOKS = "mmbatch.webhooks"

# Search (docs/search.md): training an aligner, building a (tenant, aligner) index beside the
# serving one, and merging the segments that finished batches append.
TASK_ALIGN = "mmbatch.align"
TASK_INDEX_BUILD = "mmbatch.index_build"
TASK_INDEX_MERGE = "mmbatch.index_merge"

# The task that runs a job's step after its batches (mmbatch.contract.training_step names it).
STEP_TASKS: dict[str, str] = {"train": TASK_TRAIN, "align": TASK_ALIGN}

TASK_QUEUES: dict[str, str] = {
    TASK_INGEST: INGEST_QUEUE,
    TASK_PROCESS_BATCH: MODEL_QUEUE,
    TASK_TRAIN: TRAIN_QUEUE,
    TASK_REPROCESS: INGEST_QUEUE,
    TASK_SWEEP: INGEST_QUEUE,
    TASK_WEBHOOKS: INGEST_QUEUE,
    # like training: long, so neither holds the batches' worker
    TASK_ALIGN: TRAIN_QUEUE,
    TASK_INDEX_BUILD: TRAIN_QUEUE,
    TASK_INDEX_MERGE: INGEST_QUEUE,  # FAISS and numpy only: no torch
}

# --- models -------------------------------------------------------------------------------------

STRATEGIES: tuple[str, ...] = ("concat", "weighted", "gated", "attention", "hierarchical", "late",
                               "stack")
# What a train job fuses with when it names no strategy: per (modality, feature family) heads
# stacked on out-of-fold predictions (models.stacking; docs/models.md says what it beat).
DEFAULT_STRATEGY = "stack"
# A fusion model's inputs ("columns") are modalities and feature families of a modality
# (models.families): "image" is the pretrained encoder's features, "image:hog" a family's.
COLUMN_SEPARATOR = ":"


def column_modality(column: str) -> str:
    """The modality an input column belongs to: ``"image:hog"`` -> ``"image"``."""
    return column.split(COLUMN_SEPARATOR, 1)[0]


LOSSES: tuple[str, ...] = ("ce", "weighted", "focal")
# How a train job treats each modality's encoder (docs/models.md).
ENCODER_MODES: tuple[str, ...] = ("frozen", "finetune", "scratch", "auto")
DEFAULT_BUDGET_SECONDS = 300.0  # the most a train job's default time budget grows to


def default_budget(items: int) -> float:
    """A train job's time budget in seconds when it names none: a tenth of a second per
    labelled item, between 60 and DEFAULT_BUDGET_SECONDS (3,000 items: 300 s). It bounds
    ``mode=auto``'s trials and adapted encoders' trainings, and the stacking's search of each
    head's regularisation; the budget option overrides it."""
    return float(min(DEFAULT_BUDGET_SECONDS, max(60.0, items / 10)))
# What a model version is: a fusion classifier (train jobs) or an aligner into one shared space
# for every modality (align jobs). Defaults are per tenant and kind.
MODEL_KINDS: tuple[str, ...] = ("classifier", "aligner")
# What a search may ask to match: one modality's vectors, or any. ``video``: a clip's sampled
# frames, each indexed with its time (docs/search.md).
SEARCH_MODALITIES: tuple[str, ...] = MODALITIES + ("any",)
# The train options an align job reads (the others are a classifier's).
ALIGN_OPTIONS: tuple[str, ...] = ("name", "epochs", "seed")

# --- a train job's options ----------------------------------------------------------------------

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class OptionError(ValueError):
    """A train option that cannot be used: ``field`` names it (the API answers
    ``invalid_<field>``), the message says why."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def _option(kind: str, doc: str = "", *, choices: tuple[str, ...] = (), low: float | None = None,
            high: float | None = None, unit: str = "", allowed: str = "") -> Any:
    """A TrainOptions field: None when not given, with what parsing and the document need.
    ``allowed`` words the range where "between low and high" would not say it all."""
    return field(default=None, metadata={"kind": kind, "doc": doc, "choices": choices,
                                         "low": low, "high": high, "unit": unit,
                                         "allowed": allowed})


MODE_FIELDS: tuple[str, ...] = ("mode", "image_mode", "text_mode", "audio_mode")


@dataclass(frozen=True)
class TrainOptions:
    """What a train job asks of its training; every field None when not given (the worker's
    defaults apply). Parsed once from the request's form (:meth:`parse`), stored on the job
    (:meth:`to_dict`), read back by the worker (:meth:`from_dict`); the OpenAPI document
    describes the same fields (:meth:`schema`)."""

    name: str | None = _option("text", "the name of the model the job makes (a new version of "
                                       "it when the name exists)", high=128)
    epochs: int | None = _option("int", "at most this many epochs", low=1, high=10_000)
    seed: int | None = _option("int", "seeds the split, the initialisation and the batches",
                               low=0, high=2**31 - 1)
    strategy: str | None = _option("choice", "how the modalities are fused",
                                   choices=STRATEGIES)
    loss: str | None = _option("choice", "the training loss", choices=LOSSES)
    gamma: float | None = _option("float", "loss=focal only", low=0.0, high=10.0)
    balanced: bool | None = _option("bool", "draw each epoch's items so that every class is "
                                            "equally likely")
    modality_dropout: float | None = _option("float", "chance of hiding each present modality "
                                                      "of an item while training",
                                             low=0.0, high=0.9)
    patience: int | None = _option("int", "epochs without a better validation score before "
                                          "stopping", low=1, high=10_000)
    mode: str | None = _option("choice", "how the encoders of every modality are trained",
                               choices=ENCODER_MODES)
    image_mode: str | None = _option("choice", "how the image encoder is trained",
                                     choices=ENCODER_MODES)
    text_mode: str | None = _option("choice", "how the text encoder is trained",
                                    choices=ENCODER_MODES)
    audio_mode: str | None = _option("choice", "how the audio encoder is trained",
                                     choices=ENCODER_MODES)
    budget: float | None = _option("float", "the time budget in seconds of mode=auto's "
                                            "trials, adapted encoders and the stacking's "
                                            "search (default: 0.1 s per item, 60 to 300)",
                                   low=10.0, high=3600.0, unit="seconds")
    stacking_folds: int | None = _option(
        "int", "strategy=late only: 0 trains the per-modality classifiers and their weights "
               "jointly; 2 to 10 fits the weights on that many folds' out-of-fold predictions "
               "(1 is rejected)", low=0, high=10,
        allowed="0 (joint training) or between 2 and 10")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                object.__setattr__(self, f.name, _checked(f, value))
        if self.gamma is not None and self.loss != "focal":
            raise OptionError("gamma", "gamma applies to loss=focal only")
        folds = self.stacking_folds
        if folds is not None:
            if folds == 1:
                raise _out_of_range(_FIELDS["stacking_folds"])
            if folds and self.strategy != "late":
                raise OptionError("stacking_folds",
                                  "stacking_folds applies to strategy=late only")
            if folds and any(getattr(self, m) not in (None, "frozen") for m in MODE_FIELDS):
                raise OptionError("stacking_folds",
                                  "stacking_folds applies to frozen encoders only (mode=frozen)")

    @classmethod
    def parse(cls, form: Mapping[str, str]) -> TrainOptions:
        """The options a request's form gives (absent or blank fields stay None); OptionError
        names the first field that is wrong."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = (form.get(f.name) or "").strip()
            if raw:
                values[f.name] = _from_text(f, raw)
        return cls(**values)

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> TrainOptions:
        """The options a job stored (:meth:`to_dict`); other keys of ``stored`` are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in names and v is not None})

    def to_dict(self) -> dict[str, Any]:
        """The options that were given, as JSON-able values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    def encoder_modes(self, modalities: tuple[str, ...] | list[str]) -> dict[str, str]:
        """Each modality's encoder mode: ``<modality>_mode``, else ``mode``, else frozen; a
        derived modality (``DERIVED_MODALITIES``) is always frozen."""
        return {m: "frozen" if m in DERIVED_MODALITIES
                else getattr(self, f"{m}_mode", None) or self.mode or "frozen"
                for m in modalities}

    @classmethod
    def schema(cls) -> dict[str, dict[str, Any]]:
        """Each field as an OpenAPI 3.0 schema of a form field."""
        out: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(cls):
            meta = f.metadata
            kind = meta["kind"]
            schema: dict[str, Any]
            if kind == "choice":
                schema = {"type": "string", "enum": list(meta["choices"])}
            elif kind == "bool":
                schema = {"type": "boolean"}
            elif kind == "text":
                schema = {"type": "string", "maxLength": int(meta["high"])}
            else:
                schema = {"type": "integer" if kind == "int" else "number",
                          "minimum": meta["low"], "maximum": meta["high"]}
            if meta["doc"]:
                schema["description"] = meta["doc"]
            out[f.name] = schema
        return out


_FIELDS = {f.name: f for f in dataclasses.fields(TrainOptions)}


def _out_of_range(f: dataclasses.Field[Any]) -> OptionError:
    meta = f.metadata
    low, high, unit = meta["low"], meta["high"], meta["unit"]
    allowed = meta["allowed"] or (f"between {low:g} and {high:g}" if meta["kind"] == "float"
                                  else f"between {low} and {high}")
    return OptionError(f.name, f"{f.name} must be {allowed}" + (f" {unit}" if unit else ""))


def _from_text(f: dataclasses.Field[Any], raw: str) -> Any:
    """A form field's text as the field's type (checked against its range by _checked)."""
    kind = f.metadata["kind"]
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise OptionError(f.name, f"{f.name} must be an integer") from None
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            unit = f" of {f.metadata['unit']}" if f.metadata["unit"] else ""
            raise OptionError(f.name, f"{f.name} must be a number{unit}") from None
    if kind == "bool":
        word = raw.lower()
        if word not in _TRUE | _FALSE:
            raise OptionError(f.name, f"{f.name} must be true or false")
        return word in _TRUE
    if kind == "choice":
        return raw.lower()
    return raw


def _checked(f: dataclasses.Field[Any], value: Any) -> Any:
    """``value`` if it fits the field (type, range, choices); OptionError otherwise."""
    meta = f.metadata
    kind, low, high = meta["kind"], meta["low"], meta["high"]
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(f.name, f"{f.name} must be an integer")
        if not low <= value <= high:
            raise _out_of_range(f)
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(f.name, f"{f.name} must be a number")
        if not (math.isfinite(value) and low <= value <= high):  # NaN fails too
            raise _out_of_range(f)
        value = float(value)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise OptionError(f.name, f"{f.name} must be true or false")
    elif kind == "choice":
        if value not in meta["choices"]:
            raise OptionError(f.name, f"{f.name} must be one of {', '.join(meta['choices'])}; "
                                      f"got {value!r}")
    elif not isinstance(value, str) or len(value) > high or not value.isprintable():
        raise OptionError(f.name, f"{f.name} must be at most {high} printable characters")
    return value
