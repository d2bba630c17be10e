"""Alignment: projection heads that put every modality's frozen features into one shared space,
learned from an archive's own paired items (an image and its caption, a clip and its sound).

An :class:`Aligner` is a few *parts*, each mapping every modality into a unit vector; the
aligned vector of one modality is the concatenation of its parts' vectors, each scaled by the
square root of the part's weight, normalised, so that the cosine of two aligned vectors is the
weighted mean of the parts' cosines. Part kinds:

- ``linear``: standardise, one linear map, L2 norm;
- ``mlp``: standardise, feature dropout, Linear-GELU-Dropout-Linear, plus a linear skip, L2 norm;
- ``anchors``: training-free: an item is represented by its softmax-weighted similarities to the
  training pairs of its modality (``similarities to the training pairs as the
  representation``); two modalities of one anchor pair share a coordinate, so a caption and a
  picture that resemble the same training pairs come out close. What a tiny archive gets.

``linear`` and ``mlp`` train with the symmetric InfoNCE loss over every pair of modalities an
item has, with a learned temperature, modality dropout, optionally hardness-weighted negatives,
AdamW and early stopping on validation recall. :func:`train_aligner` tries the candidates, keeps
the one (or the ensemble of the two best) that wins on validation recall, refits it on every
item for the epochs validation chose, and reports what it tried.

Pure PyTorch: tensors in, tensors out; nothing here reads files or the database.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as save_tensors
from torch import nn

from models.checkpoint import load_weights, state_tensors

PART_KINDS = ("linear", "mlp", "anchors")
FORMAT = "mmbatch.aligner"
FORMAT_VERSION = 1
TINY = 200  # fewer training pairs than this: the training-free anchors method
RECALL_AT = (1, 5, 10)


@dataclass(frozen=True)
class PartConfig:
    """One part of an aligner: its kind, output size and weight in the ensemble."""

    kind: str
    dim: int = 256
    hidden: int = 1024
    dropout: float = 0.2  # mlp: on the input features and the hidden layer
    temperature: float = 0.05  # anchors: the softmax's temperature over the anchors
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in PART_KINDS:
            raise ValueError(f"part kind must be one of {PART_KINDS}, got {self.kind!r}")
        if self.dim < 1 or self.hidden < 1:
            raise ValueError("dim and hidden must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.temperature <= 0 or self.weight <= 0:
            raise ValueError("temperature and weight must be positive")


@dataclass(frozen=True)
class AlignerConfig:
    """The modalities an aligner embeds (with their feature sizes) and its parts."""

    input_dims: dict[str, int]
    parts: tuple[PartConfig, ...]

    def __post_init__(self) -> None:
        if len(self.input_dims) < 1 or any(d < 1 for d in self.input_dims.values()):
            raise ValueError(f"input_dims must name modalities with positive sizes, got "
                             f"{self.input_dims}")
        if not self.parts:
            raise ValueError("an aligner needs at least one part")

    def to_dict(self) -> dict[str, Any]:
        return {"input_dims": dict(self.input_dims),
                "parts": [vars(p).copy() for p in self.parts]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlignerConfig:
        return cls({str(k): int(v) for k, v in d["input_dims"].items()},
                   tuple(PartConfig(**p) for p in d["parts"]))


class _Standardise(nn.Module):
    """(x - mean) / std with statistics fitted on the training features: (B, D) -> (B, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, x: torch.Tensor) -> None:
        self.mean.copy_(x.mean(dim=0))
        self.std.copy_(x.std(dim=0).clamp_min(1e-4) if len(x) > 1 else torch.ones_like(x[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _Head(nn.Module):
    """One modality's trainable head of a linear or mlp part: (B, D_m) -> (B, dim), unit."""

    def __init__(self, in_dim: int, cfg: PartConfig) -> None:
        super().__init__()
        self.norm = _Standardise(in_dim)
        self.linear = nn.Linear(in_dim, cfg.dim)
        self.mlp: nn.Module | None = None
        if cfg.kind == "mlp":
            self.mlp = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(in_dim, cfg.hidden),
                                     nn.GELU(), nn.Dropout(cfg.dropout),
                                     nn.Linear(cfg.hidden, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        out = self.linear(x)  # (B, dim)
        if self.mlp is not None:
            out = out + self.mlp(x)
        return F.normalize(out, dim=-1)


class _Anchors(nn.Module):
    """One modality's anchors: (B, D_m) -> (B, N) unit, softmax over cosine similarity to the N
    training pairs that have the modality (others get no weight)."""

    def __init__(self, in_dim: int, count: int, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature
        self.norm = _Standardise(in_dim)
        self.register_buffer("anchors", torch.zeros(count, in_dim))  # standardised, unit
        self.register_buffer("present", torch.zeros(count, dtype=torch.bool))

    def fit(self, x: torch.Tensor, present: torch.Tensor) -> None:
        self.norm.fit(x[present])
        self.anchors.copy_(F.normalize(self.norm(x), dim=-1) * present[:, None])
        self.present.copy_(present)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sims = F.normalize(self.norm(x), dim=-1) @ self.anchors.T  # (B, N)
        sims = sims.masked_fill(~self.present, float("-inf"))
        return F.normalize(torch.softmax(sims / self.temperature, dim=-1), dim=-1)


class Aligner(nn.Module):
    """Every modality of ``cfg.input_dims`` into one space: :meth:`embed` (B, D_m) -> (B, dim).

    ``anchor_count``: how many training pairs the anchors parts hold (0 without one).
    """

    def __init__(self, cfg: AlignerConfig, anchor_count: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.parts = nn.ModuleList()
        for part in cfg.parts:
            if part.kind == "anchors":
                if anchor_count < 1:
                    raise ValueError("an anchors part needs anchor_count >= 1")
                heads: dict[str, nn.Module] = {m: _Anchors(d, anchor_count, part.temperature)
                                               for m, d in cfg.input_dims.items()}
            else:
                heads = {m: _Head(d, part) for m, d in cfg.input_dims.items()}
            self.parts.append(nn.ModuleDict(heads))
        # log of 1 / temperature, learned; CLIP's start (0.07) and cap (100)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def modalities(self) -> list[str]:
        return list(self.cfg.input_dims)

    @property
    def dim(self) -> int:
        return sum(self._part_dim(i) for i in range(len(self.parts)))

    def _part_dim(self, i: int) -> int:
        head = next(iter(self.parts[i].values()))  # type: ignore[attr-defined]
        return int(head.anchors.shape[0]) if isinstance(head, _Anchors) else self.cfg.parts[i].dim

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def embed(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """(B, D_m) features of ``modality`` -> (B, dim) unit vectors in the shared space."""
        if modality not in self.cfg.input_dims:
            raise ValueError(f"this aligner was not trained on {modality!r}; it embeds "
                             f"{', '.join(self.cfg.input_dims)}")
        weights = [p.weight for p in self.cfg.parts]
        total = sum(weights)
        outs = [part[modality](x) * math.sqrt(w / total)  # type: ignore[index]
                for part, w in zip(self.parts, weights, strict=True)]
        return F.normalize(torch.cat(outs, dim=-1), dim=-1)


# --- training ------------------------------------------------------------------------------------

@dataclass
class PairedFeatures:
    """Items' frozen features: per modality (N, D_m), zeros where an item lacks it, and which
    items have which (N, M) in the order of ``features``."""

    features: dict[str, torch.Tensor]
    mask: torch.Tensor

    def __post_init__(self) -> None:
        n = self.mask.shape[0]
        if self.mask.shape[1] != len(self.features) or any(
                x.shape[0] != n for x in self.features.values()):
            raise ValueError("features and mask disagree on the items or modalities")

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    def subset(self, idx: Sequence[int]) -> PairedFeatures:
        index = torch.as_tensor(list(idx), dtype=torch.long)
        return PairedFeatures({m: x[index] for m, x in self.features.items()}, self.mask[index])

    def has(self, modality: str) -> torch.Tensor:
        return self.mask[:, list(self.features).index(modality)]

    def pairs(self) -> list[tuple[str, str]]:
        """Modality pairs that some item has both of."""
        out = []
        for a, b in itertools.combinations(self.features, 2):
            if bool((self.has(a) & self.has(b)).any()):
                out.append((a, b))
        return out


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-2
    modality_dropout: float = 0.1  # chance of hiding a modality of an item with 3 or more
    hard_negatives: float = 0.0  # beta of hardness-weighted negatives (0: plain InfoNCE)
    patience: int = 30  # epochs without a better validation score
    eval_every: int = 5
    seed: int = 0


@dataclass
class TrainedAligner:
    model: Aligner
    method: str  # what won: "linear", "mlp", "anchors", "linear+mlp", …
    epochs: int  # what the final fit ran (0 for anchors)
    validation: dict[str, Any] | None  # recall report of the split's model on validation
    candidates: list[dict[str, Any]] = field(default_factory=list)  # what was tried, scores
    seconds: float = 0.0


def info_nce(za: torch.Tensor, zb: torch.Tensor, scale: torch.Tensor,
             hard_negatives: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE of matched rows (B, D) x (B, D) at logit ``scale``; with
    ``hard_negatives`` = beta > 0, negatives are reweighted by exp(beta * similarity)
    (Robinson et al., 2021), normalised to the same total weight."""
    logits = scale * za @ zb.T  # (B, B)
    if hard_negatives > 0:
        eye = torch.eye(len(za), dtype=torch.bool, device=za.device)
        with torch.no_grad():
            w = torch.exp(hard_negatives * (za @ zb.T)).masked_fill(eye, 0.0)
            w_rows = w / w.sum(1, keepdim=True).clamp_min(1e-12) * (len(za) - 1)
            w_cols = w / w.sum(0, keepdim=True).clamp_min(1e-12) * (len(za) - 1)
        rows = logits + torch.log(w_rows.masked_fill(eye, 1.0).clamp_min(1e-12))
        cols = logits + torch.log(w_cols.masked_fill(eye, 1.0).clamp_min(1e-12))
        target = torch.arange(len(za), device=za.device)
        return (F.cross_entropy(rows, target) + F.cross_entropy(cols.T, target)) / 2
    target = torch.arange(len(za), device=za.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _fit_standardisation(model: Aligner, data: PairedFeatures) -> None:
    for part in model.parts:
        for m, head in part.items():  # type: ignore[attr-defined]
            have = data.has(m)
            if isinstance(head, _Anchors):
                head.fit(data.features[m], have)
            elif bool(have.any()):
                head.norm.fit(data.features[m][have])


def _batch_loss(model: Aligner, data: PairedFeatures, idx: torch.Tensor, s: TrainSettings,
                gen: torch.Generator) -> torch.Tensor | None:
    mask = data.mask[idx].clone()  # (B, M)
    if s.modality_dropout > 0:
        # hide a modality only of items that keep at least two
        drop = torch.rand(mask.shape, generator=gen) < s.modality_dropout
        keep_two = mask.sum(1, keepdim=True) - (drop & mask).sum(1, keepdim=True) >= 2
        mask &= ~(drop & keep_two)
    names = list(data.features)
    z = {m: model.embed(m, data.features[m][idx]) for m in names}
    losses = []
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        both = mask[:, i] & mask[:, j]
        if int(both.sum()) >= 2:
            losses.append(info_nce(z[a][both], z[b][both], model.scale(), s.hard_negatives))
    return torch.stack(losses).mean() if losses else None


def fit(model: Aligner, train: PairedFeatures, s: TrainSettings, val: PairedFeatures | None = None,
        on_epoch: Callable[[int], None] | None = None) -> tuple[int, float | None]:
    """Train ``model`` in place; with ``val``, early stopping on its recall score and the best
    epoch's weights restored. Returns (epochs that counted, best validation score)."""
    _fit_standardisation(model, train)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(s.seed)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    best, best_epoch, best_state = -1.0, s.epochs, None
    for epoch in range(1, s.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        for start in range(0, len(order), s.batch_size):
            idx = order[start:start + s.batch_size]
            if len(idx) < 2:
                continue
            loss = _batch_loss(model, train, idx, s, gen)
            if loss is None:
                continue
            opt.zero_grad()
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch)
        if val is not None and (epoch % s.eval_every == 0 or epoch == s.epochs):
            score = recall_score(recall_report(model, val))
            if score > best:
                best, best_epoch = score, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif epoch - best_epoch >= s.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return (best_epoch if val is not None else s.epochs), (best if val is not None else None)


# --- evaluation ----------------------------------------------------------------------------------

def ranks(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Rank (1 = first) of each query's own row of ``gallery`` among all gallery rows, by cosine
    of unit vectors: (Q, D) x (Q, D) -> (Q,). Ties count against the query."""
    sims = queries @ gallery.T  # (Q, Q)
    own = np.diag(sims)[:, None]
    return (sims >= own).sum(axis=1)


def recall_of(r: np.ndarray) -> dict[str, float]:
    out = {f"r@{k}": round(float((r <= k).mean()), 4) for k in RECALL_AT}
    out["median_rank"] = float(np.median(r))
    out["queries"] = len(r)
    return out


@torch.no_grad()
def embed_all(model: Aligner, data: PairedFeatures, batch: int = 1024) -> dict[str, np.ndarray]:
    """Each modality's aligned vectors over the items that have it, in item order."""
    model.eval()
    out = {}
    for m in data.features:
        if m not in model.cfg.input_dims:
            continue
        x = data.features[m][data.has(m)]
        out[m] = torch.cat([model.embed(m, x[i:i + batch]) for i in range(0, len(x), batch)]
                           or [torch.zeros(0, model.dim)]).numpy()
    return out


def recall_report(model: Aligner, data: PairedFeatures) -> dict[str, Any]:
    """Recall@1/5/10 and median rank per direction and modality pair: every item that has both
    modalities asks with one to find itself among the others' second modality.
    ``{"text->image": {"r@1", "r@5", "r@10", "median_rank", "queries"}, …}``."""
    z = embed_all(model, data)
    out: dict[str, Any] = {}
    for a, b in data.pairs():
        if a not in z or b not in z:
            continue
        both = data.has(a) & data.has(b)
        za = z[a][both[data.has(a)].numpy()]
        zb = z[b][both[data.has(b)].numpy()]
        out[f"{a}->{b}"] = recall_of(ranks(za, zb))
        out[f"{b}->{a}"] = recall_of(ranks(zb, za))
    return out


def recall_score(report: dict[str, Any]) -> float:
    """One number to choose by: the mean of R@1, R@5 and R@10 over every direction."""
    scores = [(d["r@1"] + d["r@5"] + d["r@10"]) / 3 for d in report.values()]
    return float(np.mean(scores)) if scores else 0.0


# --- choosing a method ---------------------------------------------------------------------------

CANDIDATES: dict[str, tuple[PartConfig, ...]] = {
    "linear": (PartConfig("linear", dim=256),),
    "mlp": (PartConfig("mlp", dim=256, hidden=1024, dropout=0.3),),
}


def _build(input_dims: dict[str, int], parts: tuple[PartConfig, ...], anchors: int,
           seed: int) -> Aligner:
    torch.manual_seed(seed)
    return Aligner(AlignerConfig(dict(input_dims), parts), anchor_count=anchors)


def anchors_aligner(data: PairedFeatures, temperature: float = 0.05) -> Aligner:
    """The training-free aligner: the items of ``data`` are the anchors."""
    dims = {m: int(x.shape[1]) for m, x in data.features.items()}
    model = _build(dims, (PartConfig("anchors", temperature=temperature),), len(data), 0)
    _fit_standardisation(model, data)
    return model.eval()


def train_aligner(data: PairedFeatures, train_idx: Sequence[int], val_idx: Sequence[int],
                  settings: TrainSettings = TrainSettings(),
                  on_epoch: Callable[[int], None] | None = None) -> TrainedAligner:
    """Try the methods on the train split, keep the best on validation recall (anchors for a
    tiny archive), and refit it on every item. ``data`` holds every item, indexed by the
    splits."""
    started = time.perf_counter()
    if not data.pairs():
        raise ValueError("no item has two modalities: there is nothing to align")
    train = data.subset(train_idx)
    val = data.subset(val_idx) if len(val_idx) >= 2 else None
    dims = {m: int(x.shape[1]) for m, x in data.features.items()}
    tried: list[dict[str, Any]] = []

    if len(train_idx) < TINY or val is None:
        best_t, best_score, report = 0.05, -1.0, None
        for t in (0.02, 0.05, 0.1) if val is not None else (0.05,):
            score_report = recall_report(anchors_aligner(train, t), val) if val else None
            score = recall_score(score_report) if score_report else 0.0
            tried.append({"method": "anchors", "temperature": t, "score": round(score, 4)})
            if score > best_score:
                best_t, best_score, report = t, score, score_report
        return TrainedAligner(anchors_aligner(data, best_t), "anchors", 0, report, tried,
                              time.perf_counter() - started)

    results: dict[str, tuple[Aligner, int, float]] = {}
    for name, parts in CANDIDATES.items():
        model = _build(dims, parts, 0, settings.seed)
        epochs, score = fit(model, train, settings, val, on_epoch)
        results[name] = (model, epochs, float(score or 0.0))
        tried.append({"method": name, "epochs": epochs, "score": round(float(score or 0), 4)})
    ranked = sorted(results, key=lambda n: -results[n][2])
    # the ensemble of the two best: their aligned vectors side by side
    first, second = ranked[0], ranked[1]
    ensemble = _ensemble(dims, [results[first][0], results[second][0]])
    ens_score = recall_score(recall_report(ensemble, val))
    tried.append({"method": f"{first}+{second}", "score": round(ens_score, 4)})
    if ens_score > results[first][2]:
        method, chosen = f"{first}+{second}", [first, second]
        report = recall_report(ensemble, val)
    else:
        method, chosen = first, [first]
        report = recall_report(results[first][0], val)
    # refit the winner(s) on every item for the epochs validation chose
    final_parts = []
    for name in chosen:
        model = _build(dims, CANDIDATES[name], 0, settings.seed)
        fit(model, data, _replace(settings, epochs=max(results[name][1], 1)), None, on_epoch)
        final_parts.append(model)
    final = final_parts[0] if len(final_parts) == 1 else _ensemble(dims, final_parts)
    epochs = max(results[n][1] for n in chosen)
    return TrainedAligner(final.eval(), method, epochs, report, tried,
                          time.perf_counter() - started)


def _replace(s: TrainSettings, **changes: Any) -> TrainSettings:
    return TrainSettings(**{**vars(s), **changes})


def _ensemble(dims: dict[str, int], models: list[Aligner]) -> Aligner:
    """One aligner whose parts are the parts of ``models``, equally weighted."""
    parts = tuple(p for m in models for p in m.cfg.parts)
    out = Aligner(AlignerConfig(dict(dims), parts))
    out.parts = nn.ModuleList([p for m in models for p in m.parts])
    return out.eval()


# --- checkpoint ----------------------------------------------------------------------------------

def save_aligner(model: Aligner) -> tuple[bytes, dict[str, Any]]:
    """The aligner's weights as safetensors bytes, and the config that rebuilds it."""
    anchors = _anchor_count(model)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "aligner": model.cfg.to_dict(), "anchor_count": anchors, "dim": model.dim}
    return save_tensors(state_tensors(model), metadata={"format": FORMAT}), config


def load_aligner(data: bytes, config: dict[str, Any]) -> Aligner:
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} checkpoint config")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported aligner format_version {config.get('format_version')!r}")
    model = Aligner(AlignerConfig.from_dict(config["aligner"]),
                    anchor_count=int(config.get("anchor_count") or 0))
    return load_weights(model, data, "aligner")


def _anchor_count(model: Aligner) -> int:
    for part in model.parts:
        head = next(iter(part.values()))  # type: ignore[attr-defined]
        if isinstance(head, _Anchors):
            return int(head.anchors.shape[0])
    return 0


# --- applying an aligner -------------------------------------------------------------------------

@torch.no_grad()
def embed_items(model: Aligner, feats: Sequence[dict[str, np.ndarray]]
                ) -> list[dict[str, np.ndarray]]:
    """Per item, the aligned unit vector (dim,) of each present modality the aligner knows."""
    model.eval()
    out: list[dict[str, np.ndarray]] = [{} for _ in feats]
    for m in model.modalities:
        rows = [i for i, f in enumerate(feats) if m in f]
        if not rows:
            continue
        x = torch.from_numpy(np.stack([np.asarray(feats[i][m], dtype=np.float32) for i in rows]))
        z = model.embed(m, x).numpy()  # (n, dim)
        for i, v in zip(rows, z, strict=True):
            out[i][m] = v
    return out


def item_vector(vectors: dict[str, np.ndarray]) -> np.ndarray | None:
    """One vector for an item: the normalised mean of its modalities' aligned vectors (what an
    item's result stores, and what "items like this one" searches with)."""
    if not vectors:
        return None
    mean = np.mean(np.stack(list(vectors.values())), axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
