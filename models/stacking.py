"""``strategy=stack``: one linear head per input column (a modality's encoder features, or a
feature family of it: models.families), combined by a linear meta-model fitted on out-of-fold
predictions.

Why: on data far from the pretrained encoders' world, which witness to trust differs per archive
(the encoder's features, raw pixels, gradient histograms, character n-grams, cepstra), and a
model trained on all of them at once trusts the one that memorises its training items best.
Out-of-fold predictions show each head on items it never saw, so the meta-model learns what
each is worth on new data. The steps:

1. folds over the training split that keep groups apart (``labels.csv``'s ``group``; else items
   sharing a file, which would otherwise vouch for each other across folds);
2. per column, a multinomial logistic regression on its standardised features (TF-IDF for
   hashed n-gram counts), its regularisation chosen among a few values by out-of-fold log loss,
   as far as the time budget allows; each column's out-of-fold log-probabilities;
3. columns no better than the class prior out of fold are dropped (the metrics say why);
4. the meta-model, a multinomial logistic regression over the kept columns' centred
   out-of-fold log-probabilities (zeros where an item lacks a column: a missing modality is a
   uniform vote, at training as at inference);
5. the heads refitted on the whole training split, and everything copied into a
   ``FusionClassifier`` with ``strategy="stack"`` (the usual checkpoint, inference,
   calibration and explanations).

The meta-model's own out-of-fold predictions (the folds again, over the heads' out-of-fold
inputs) are the train job's out-of-fold probabilities: label issues reuse them.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from scipy import sparse
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from threadpoolctl import threadpool_limits

from mmbatch.contract import column_modality
from mmbatch.scoring import scores
from models.fusion import LOG_PROB_FLOOR, FusionClassifier, FusionConfig
from models.training import FeatureSet, TrainConfig, _val_scores, fit

MAX_FOLDS = 5
# Regularisation strengths tried per column, the first one always (it is the usual best): for
# standardised dense features (hundreds to a thousand of them, a few thousand items) strong
# regularisation wins; for L2-normalised TF-IDF rows weak.
DENSE_C = (0.05, 0.01, 0.25)
COUNT_C = (10.0, 3.0, 30.0)
META_C = 1.0
# A column is kept when out of fold it beats the class prior: its log loss by MIN_GAIN nats,
# or its accuracy the majority class's share by MIN_ACCURACY_GAIN.
MIN_GAIN = 0.02
MIN_ACCURACY_GAIN = 0.03
STD_FLOOR = 1e-3
# A head's log-probabilities are floored, so that one overconfident head cannot outvote every
# other column by itself; the same floor in models.fusion.
LOG_FLOOR = LOG_PROB_FLOOR
UNSEEN = -30.0  # the logit of a class a head never saw in training


@dataclass
class StackResult:
    """The fitted model, the metrics ``fit`` also reports plus ``stacking``, and the
    out-of-fold class probabilities of every training item (N_train, C)."""

    model: FusionClassifier
    metrics: dict[str, Any]
    oof: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)


def fit_fusion(train: FeatureSet, val: FeatureSet | None, cfg: FusionConfig,
               tcfg: TrainConfig, groups: Sequence[str | None] | None = None
               ) -> tuple[FusionClassifier, dict[str, Any]]:
    """Any strategy on cached features: ``stack`` fitted here, the others by gradient descent
    (models.training.fit)."""
    if cfg.strategy == "stack":
        result = fit_stack(train, val, cfg, tcfg, groups)
        return result.model, result.metrics
    return fit(train, val, cfg, tcfg)


def group_folds(labels: Sequence[int], groups: Sequence[str | None] | None, seed: int,
                max_folds: int = MAX_FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, held-out rows) per fold: stratified by label, groups kept whole (an item
    without a group is its own), as many folds as the rarest class allows (2 to max_folds)."""
    y = np.asarray(labels)
    counts = np.bincount(y)
    folds = int(min(max_folds, max(2, counts[counts > 0].min())))
    x = np.zeros((len(y), 1))
    if groups is not None and any(g is not None for g in groups):
        ids = [g if g is not None else f"\0{i}" for i, g in enumerate(groups)]
        folds = min(folds, len(set(ids)))
        if folds >= 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a class rarer than the folds
                splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
                return [(a, b) for a, b in splitter.split(x, y, ids)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        splitter2 = StratifiedKFold(n_splits=max(2, folds), shuffle=True, random_state=seed)
        return [(a, b) for a, b in splitter2.split(x, y)]


@dataclass
class _Head:
    """One column's fitted head: standardisation (or IDF) and the logistic regression."""

    mean: np.ndarray | None
    std: np.ndarray | None
    idf: np.ndarray | None
    lr: LogisticRegression

    def transform(self, x: np.ndarray) -> Any:
        if self.idf is not None:
            return _tfidf(x, self.idf)
        assert self.mean is not None and self.std is not None
        return (x - self.mean) / self.std

    def log_probs(self, x: np.ndarray, num_classes: int) -> np.ndarray:
        """(n, C) log-probabilities floored at LOG_FLOOR, exactly as the module computes them
        (classes the head never saw get the logit UNSEEN)."""
        logits = np.full((len(x), num_classes), UNSEEN)
        decision = self.lr.decision_function(self.transform(x))
        if decision.ndim == 1:  # binary: scikit-learn keeps one logit
            decision = np.stack([-decision / 2, decision / 2], axis=1)
        logits[:, self.lr.classes_] = decision
        logits -= logits.max(axis=1, keepdims=True)
        out = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return np.maximum(out, LOG_FLOOR)


def _tfidf(counts: np.ndarray, idf: np.ndarray) -> sparse.csr_matrix:
    """Sublinear TF-IDF, L2-normalised rows (what models.fusion.TfIdf computes)."""
    m = sparse.csr_matrix(counts, dtype=np.float64)
    m.data = 1.0 + np.log(m.data)
    m = m.multiply(idf[None, :]).tocsr()
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1))).ravel()
    return sparse.diags(1.0 / np.maximum(norms, 1e-12)) @ m


def _fit_head(x: np.ndarray, y: np.ndarray, counts: bool, c: float, seed: int,
              class_weight: str | None) -> _Head:
    if counts:
        idf = TfidfTransformer(sublinear_tf=True).fit(sparse.csr_matrix(x)).idf_
        head = _Head(None, None, idf.astype(np.float64), LogisticRegression())
    else:
        head = _Head(x.mean(axis=0), np.maximum(x.std(axis=0), STD_FLOOR), None,
                     LogisticRegression())
    head.lr = LogisticRegression(C=c, max_iter=500, class_weight=class_weight,
                                 random_state=seed).fit(head.transform(x), y)
    return head


def fit_head_log_probs(x: np.ndarray, y: np.ndarray, held: np.ndarray, num_classes: int,
                       tcfg: TrainConfig) -> np.ndarray:
    """A dense column's head fitted on (``x``, ``y``), its log-probabilities on ``held``: how
    an adapted encoder's column gets its out-of-fold predictions (models.adapt)."""
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        head = _fit_head(x, y, False, DENSE_C[0], tcfg.seed, _class_weight(tcfg))
    return head.log_probs(held, num_classes)


def _class_weight(tcfg: TrainConfig) -> str | None:
    return "balanced" if tcfg.loss == "weighted" or tcfg.balanced else None


def _centred(log_probs: np.ndarray) -> np.ndarray:
    return log_probs - log_probs.mean(axis=1, keepdims=True)


def _log_loss(log_probs: np.ndarray, y: np.ndarray) -> float:
    return float(-log_probs[np.arange(len(y)), y].mean())


def fit_stack(train: FeatureSet, val: FeatureSet | None, cfg: FusionConfig, tcfg: TrainConfig,
              groups: Sequence[str | None] | None = None, *, budget_seconds: float = 300.0,
              clock: Callable[[], float] = time.perf_counter,
              on_step: Callable[[str], None] | None = None,
              given: dict[str, np.ndarray] | None = None) -> StackResult:
    """Fit a ``stack`` model on ``train`` (``groups`` per training item keep folds apart),
    scored on ``val``. Every column gets its first regularisation strength; the others are
    tried while ``clock`` says less than half of ``budget_seconds`` has passed (so the budget
    is counted in the caller's clock: a fake one in tests). ``on_step`` hears of each fit (the
    worker's heartbeat). ``given``: columns whose out-of-fold log-probabilities (N, C) the
    caller computed (a trained encoder's, refitted per fold: models.adapt); their heads take
    the first strength."""
    if cfg.strategy != "stack":
        raise ValueError(f"fit_stack fits strategy 'stack', not {cfg.strategy!r}")
    # One BLAS thread: these fits are small, and BLAS threads spinning beside torch's on a
    # two-core worker made them 6 to 15 times slower (measured on the far sample).
    with threadpool_limits(limits=1):
        return _fit_stack(train, val, cfg, tcfg, groups, budget_seconds, clock, on_step,
                          given or {})


def _fit_stack(train: FeatureSet, val: FeatureSet | None, cfg: FusionConfig,
               tcfg: TrainConfig, groups: Sequence[str | None] | None, budget_seconds: float,
               clock: Callable[[], float], on_step: Callable[[str], None] | None,
               given: dict[str, np.ndarray]) -> StackResult:
    started = clock()
    wall = time.perf_counter()
    columns = list(cfg.modalities)
    c_count = cfg.num_classes
    y = train.labels.numpy()
    mask = train.mask.numpy()
    folds = group_folds(y, groups, tcfg.seed)
    class_weight = _class_weight(tcfg)
    prior = np.bincount(y, minlength=c_count) / len(y)
    prior_loss = _log_loss(np.log(np.clip(prior, 1e-6, None))[None].repeat(len(y), 0), y)
    candidates: dict[str, dict[str, Any]] = {}
    oof_columns: dict[str, np.ndarray] = {}
    chosen_c: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)
        for j, column in enumerate(columns):
            rows = np.nonzero(mask[:, j])[0]
            counts = column in cfg.count_columns
            x = train.features[column].numpy()
            grid = COUNT_C if counts else DENSE_C
            trials: list[dict[str, Any]] = []
            best: tuple[float, float, np.ndarray] | None = None
            col_started = time.perf_counter()
            if column in given:
                grid = grid[:1]
            for k, c in enumerate(grid):
                if k and clock() - started > budget_seconds / 2:
                    break  # out of time for alternatives: the first strength it is
                if column in given:
                    oof = given[column]
                    loss = _log_loss(oof[rows], y[rows]) if len(rows) else float("inf")
                    trials.append({"C": c, "oof_log_loss": round(loss, 4),
                                   "encoder": "trained per fold"})
                    best = (loss, c, oof)
                    break
                oof = np.zeros((len(y), c_count))
                for fold_train, held in folds:
                    fit_rows = np.intersect1d(fold_train, rows)
                    held_rows = np.intersect1d(held, rows)
                    if len(held_rows) == 0:
                        continue
                    if len(np.unique(y[fit_rows])) < 2:
                        oof[held_rows] = np.log(1.0 / c_count)
                        continue
                    head = _fit_head(x[fit_rows], y[fit_rows], counts, c, tcfg.seed,
                                     class_weight)
                    oof[held_rows] = head.log_probs(x[held_rows], c_count)
                    if on_step is not None:
                        on_step(column)
                loss = _log_loss(oof[rows], y[rows]) if len(rows) else float("inf")
                trials.append({"C": c, "oof_log_loss": round(loss, 4)})
                if best is None or loss < best[0]:
                    best = (loss, c, oof)
            assert best is not None
            loss, c, oof = best
            pred = oof[rows].argmax(axis=1)
            _, _, f1 = scores(y[rows], pred, c_count)
            col_prior = _log_loss(np.log(np.clip(prior, 1e-6, None))[None].repeat(len(rows), 0),
                                  y[rows]) if len(rows) else prior_loss
            candidates[column] = {
                "items": len(rows), "C": c, "trials": trials,
                "oof_accuracy": round(float((pred == y[rows]).mean()), 4) if len(rows) else None,
                "oof_macro_f1": round(f1, 4), "oof_log_loss": round(loss, 4),
                "prior_log_loss": round(col_prior, 4),
                "seconds": round(time.perf_counter() - col_started, 2)}
            oof_columns[column] = oof
            chosen_c[column] = c
    majority = float(prior.max())

    def informative(col: str) -> bool:
        """Better than the class prior out of fold: in log loss, or (an overconfident head
        that the meta-model can temper) in accuracy."""
        cand = candidates[col]
        return bool(cand["items"]) and (
            cand["oof_log_loss"] < cand["prior_log_loss"] - MIN_GAIN
            or cand["oof_accuracy"] > majority + MIN_ACCURACY_GAIN)

    kept = [col for col in columns if informative(col)]
    if not kept:  # nothing beats the prior: keep the least bad rather than nothing
        kept = [min(columns, key=lambda col: candidates[col]["oof_log_loss"]
                    - candidates[col]["prior_log_loss"])]
    for col in columns:
        cand = candidates[col]
        versus = (f"log loss {cand['oof_log_loss']} against the prior's "
                  f"{cand['prior_log_loss']}, accuracy {cand['oof_accuracy']} against "
                  f"{round(majority, 4)}")
        if col in kept:
            cand["kept"] = True
            cand["why"] = f"out of fold it beats the class prior: {versus}"
        else:
            cand["kept"] = False
            cand["why"] = ("no item has it" if not cand["items"] else
                           f"out of fold it is no better than the class prior: {versus}")
    kept_idx = [columns.index(col) for col in kept]
    votes = np.stack([np.where(mask[:, j:j + 1], _centred(oof_columns[col]), 0.0)
                      for j, col in zip(kept_idx, kept, strict=True)], axis=1)  # (N, K, C)
    z = votes.reshape(len(y), -1)
    modality_of = [column_modality(col) for col in kept]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)
        meta_oof = np.zeros((len(y), c_count))
        for fold_train, held in folds:
            if len(np.unique(y[fold_train])) < 2:
                meta_oof[held] = 1.0 / c_count
                continue
            meta_fold = _fit_meta(votes[fold_train], y[fold_train], modality_of, class_weight)
            meta_oof[np.ix_(held, meta_fold.classes_)] = meta_fold.predict_proba(z[held])
        meta = _fit_meta(votes, y, modality_of, class_weight)
        final = {col: _fit_head(train.features[col].numpy()[mask[:, j]], y[mask[:, j]],
                                col in cfg.count_columns, chosen_c[col], tcfg.seed, class_weight)
                 for j, col in zip(kept_idx, kept, strict=True)}
    meta_oof = np.clip(meta_oof, 1e-6, None)
    meta_oof /= meta_oof.sum(axis=1, keepdims=True)
    final_cfg = replace(cfg, input_dims={col: cfg.input_dims[col] for col in kept},
                        count_columns=tuple(col for col in cfg.count_columns if col in kept))
    model = _to_module(final_cfg, final, meta)
    kept_mask = train.mask[:, kept_idx]
    train_kept = FeatureSet({col: train.features[col] for col in kept}, kept_mask, train.labels)
    val_kept = (FeatureSet({col: val.features[col] for col in kept},
                           val.mask[:, [columns.index(col) for col in kept]], val.labels)
                if val is not None else None)
    _, _, train_accuracy = _val_scores(model, train_kept)
    f1, val_loss, acc = (_val_scores(model, val_kept) if val_kept is not None
                         else (None, None, None))
    oof_pred = meta_oof.argmax(axis=1)
    _, _, oof_f1 = scores(y, oof_pred, c_count)
    seconds = time.perf_counter() - wall
    report = {"folds": len(folds), "candidates": candidates,
              "kept": kept, "oof_accuracy": round(float((oof_pred == y).mean()), 4),
              "oof_macro_f1": round(oof_f1, 4), "meta_C": META_C,
              "budget_seconds": budget_seconds}
    metrics = {
        "train_accuracy": train_accuracy, "val_accuracy": acc, "val_macro_f1": f1,
        "val_loss": val_loss, "epochs": 0, "best_epoch": 0, "train_size": len(train),
        "val_size": len(val) if val is not None else 0, "seconds": round(seconds, 2),
        "seconds_per_epoch": None, "stopped": None, "strategy": "stack", "loss": tcfg.loss,
        "gamma": None, "balanced": tcfg.balanced, "seed": tcfg.seed, "stacking": report,
    }
    return StackResult(model, metrics, meta_oof, report)


def _fit_meta(votes: np.ndarray, y: np.ndarray, modality_of: list[str],
              class_weight: str | None) -> LogisticRegression:
    """The meta-model over votes (N, K, C), trained also on copies of the items with each
    modality's columns silenced (where the item has another modality), as modality dropout
    does for the other strategies: without them it learns only from items that lack a
    modality by chance (one in ten, say), and leans on a column it will not always have."""
    n = len(y)
    views, targets = [votes], [y]
    for m in dict.fromkeys(modality_of):
        cols = [k for k, mk in enumerate(modality_of) if mk == m]
        rest = [k for k in range(len(modality_of)) if k not in cols]
        has_m = np.abs(votes[:, cols]).sum(axis=(1, 2)) > 0
        has_rest = np.abs(votes[:, rest]).sum(axis=(1, 2)) > 0 if rest else np.zeros(n, bool)
        rows = np.nonzero(has_m & has_rest)[0]
        if len(rows):
            silenced = votes[rows].copy()
            silenced[:, cols] = 0.0
            views.append(silenced)
            targets.append(y[rows])
    x = np.concatenate(views).reshape(-1, votes.shape[1] * votes.shape[2])
    return LogisticRegression(C=META_C, max_iter=1000, class_weight=class_weight
                              ).fit(x, np.concatenate(targets))


def _to_module(cfg: FusionConfig, heads: dict[str, _Head], meta: LogisticRegression
               ) -> FusionClassifier:
    """The fitted heads and meta-model as a ``stack`` FusionClassifier (eval mode)."""
    model = FusionClassifier(cfg)
    c_count = cfg.num_classes
    with torch.no_grad():
        for col, head in heads.items():
            copy_linear(head.lr, model.column_heads[col], c_count)
            if head.idf is not None:
                model.tfidf[col].idf.copy_(torch.from_numpy(head.idf).float())
            else:
                assert head.mean is not None and head.std is not None
                model.set_standardization(col, torch.from_numpy(head.mean).float(),
                                          torch.from_numpy(head.std).float())
        copy_linear(meta, model.meta, c_count)
    return model.eval()


def copy_linear(lr: LogisticRegression, linear: torch.nn.Linear, num_classes: int) -> None:
    """A fitted logistic regression's weights into ``linear`` (C outputs): a class it never
    saw gets zero weights and the logit UNSEEN (never its vote); a binary one's single row
    becomes two opposite halves (the same probabilities through a softmax)."""
    weight = np.zeros((num_classes, linear.in_features))
    bias = np.full(num_classes, UNSEEN)
    coef, intercept = lr.coef_, lr.intercept_
    if len(lr.classes_) == 2:
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    weight[lr.classes_] = coef
    bias[lr.classes_] = intercept
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight).float())
        linear.bias.copy_(torch.from_numpy(bias).float())
