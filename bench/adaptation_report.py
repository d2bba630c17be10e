"""Acceptance figures of encoder adaptation, on a sample far from the encoders' pretraining.

    python -m bench.adaptation_report [--per-group 48] [--seed 0] [--budget 120] [--json FILE]

Writes ``samples.far_sample`` (16 x 16 glyph images and made-up words in eight scripts, eight
sources as ``group``), then runs the service's own train path (ingest, extraction, training,
as plain functions on SQLite, no Celery) with ``mode=frozen``, ``mode=finetune`` and
``mode=auto``, each with ``strategy=concat`` (what is compared here is the encoders; the
default train job's stacking of feature families is measured by ``bench.models_report
--shifted``). Both use
the same group-disjoint stratified split (no source on both sides). Prints validation accuracy
and macro F1 of each, auto's choice per modality with its single-modality scores and seconds
per epoch, then classifies the archive again with the auto model (the shift report).

About a minute on two CPU cores; the figures are in docs/models.md, and
tests/test_acceptance_adaptation.py asserts the criterion on the same computation.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import save_json
from mmbatch.settings import Settings
from samples.far_sample import write_far_sample
from store import jobs
from store.migrate import upgrade
from store.registry import get_model
from worker.adaptation import train_step
from worker.batch import BatchProcessor
from worker.ingest import ingest_job
from worker.runtime import Runtime


def embedded_runtime(data_dir: Path) -> Runtime:
    """The service's runtime on a fresh SQLite database and blob store under ``data_dir``,
    with no broker (jobs run as plain functions in this process)."""
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(data_dir),
                                  "MMBATCH_BROKER_URL": "memory://",
                                  "MMBATCH_BATCH_SIZE": "64"})
    upgrade(settings.db_url)
    return Runtime(settings)


def run_job(rt: Runtime, archive: Path, kind: str, model: int | None = None,
            options: dict[str, Any] | None = None) -> str:
    """Create a job and run it to the end in this process, as the worker would (a train job's
    training, a classify job's adaptation with ``adapt``)."""
    return run_timed_job(rt, archive, kind, model, options)[0]


def run_timed_job(rt: Runtime, archive: Path, kind: str, model: int | None = None,
                  options: dict[str, Any] | None = None) -> tuple[str, dict[str, float]]:
    """:func:`run_job`, and the seconds of its stages: extraction (ingest and batches) and
    what follows them (a training, an adaptation)."""
    digest = rt.blobs.put_bytes(archive.read_bytes())
    with rt.db.session() as s:
        job_id = jobs.create_job(s, kind=kind, archive_blob=digest, archive_name=archive.name,
                                 archive_bytes=archive.stat().st_size, model_version_id=model,
                                 options=options).id
    started = time.perf_counter()
    trained = 0.0
    for batch in ingest_job(rt, job_id):
        if BatchProcessor(rt, job_id, batch).run().next_step == "train":
            extracted = time.perf_counter()
            train_step(rt, job_id)
            trained = time.perf_counter() - extracted
    total = time.perf_counter() - started
    return job_id, {"extract_seconds": round(total - trained, 1),
                    "train_seconds": round(trained, 1)}


def _model_of(rt: Runtime, job_id: str) -> dict[str, Any]:
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        if job.state != "succeeded" or job.model_version_id is None:
            raise RuntimeError(f"job {job_id} {job.state}: {job.error}")
        m = get_model(s, job.model_version_id)
        return {"id": m.id, "metrics": dict(m.metrics), "encoders": dict(m.encoders),
                "config": dict(m.config)}


def measure(data_dir: Path, per_group: int = 48, seed: int = 0, budget: float = 120.0,
            epochs: int = 150,
            modes: tuple[str, ...] = ("frozen", "finetune", "auto", "default"),
            ) -> dict[str, Any]:
    """Train each of ``modes`` (frozen and auto at least) on the far sample; their metrics and
    the auto model's shift report on the training archive."""
    rt = embedded_runtime(data_dir)
    try:
        archive = write_far_sample(data_dir / "sample", per_group, seed)
        out: dict[str, Any] = {"per_group": per_group, "seed": seed, "budget": budget}
        for mode in modes:
            started = time.perf_counter()
            options = ({"name": "far-default", "seed": seed} if mode == "default" else
                       {"name": f"far-{mode}", "epochs": epochs, "seed": seed, "mode": mode,
                        "budget": budget, "patience": 25, "strategy": "concat"})
            job_id = run_job(rt, archive, "train", options=options)
            model = _model_of(rt, job_id)
            model["wall_seconds"] = time.perf_counter() - started
            out[mode] = model
        if "auto" in out:
            classify = run_job(rt, archive, "classify", model=out["auto"]["id"])
            with rt.db.session() as s:
                job = jobs.get_job(s, classify)
                out["classify"] = {"state": job.state, "shift": (job.report or {}).get("shift"),
                                   "done": job.done, "failed": job.failed}
        return out
    finally:
        rt.close()


def _print(result: dict[str, Any]) -> None:
    print(f"far sample: {result['per_group']} items per source x 8 sources, seed "
          f"{result['seed']}, budget {result['budget']:g} s")
    print("| mode | val acc | macro F1 | modes | groups train/val/shared | s/epoch | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode in [m for m in ("frozen", "finetune", "scratch", "auto", "default") if m in result]:
        m = result[mode]["metrics"]
        g = m["groups"]
        modes = ", ".join(f"{k} {v}" for k, v in m["encoder_modes"].items())
        per_epoch = (f"{m['seconds_per_epoch']:.3f}" if m.get("seconds_per_epoch") is not None
                     else "-")
        name = "default (stack)" if mode == "default" else f"{mode} (concat)"
        print(f"| {name} | {100 * m['val_accuracy']:.1f} | {100 * m['val_macro_f1']:.1f} | "
              f"{modes} | {g['train']}/{g['val']}/{g['shared']} | "
              f"{per_epoch} | {result[mode]['wall_seconds']:.0f} |")
    adaptation = result["auto"]["metrics"].get("adaptation", {}).get("modalities", {})
    print("\n| modality | frozen alone F1 | finetune alone F1 | finetune s/epoch | "
          "scratch alone F1 | scratch s/epoch | chosen |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for modality, r in adaptation.items():
        if "frozen" in r:
            cells = [f"{100 * r['frozen']['val_macro_f1']:.1f}"]
            for c in ("finetune", "scratch"):
                cells += ([f"{100 * r[c]['val_macro_f1']:.1f}", f"{r[c]['seconds_per_epoch']:.3f}"]
                          if c in r else ["-", "-"])
            print(f"| {modality} | {' | '.join(cells)} | {r['mode']} |")
    shift = result["classify"]["shift"] or {}
    print("\nshift of the training archive against the auto model:",
          json.dumps(shift.get("modalities")), "warnings:", shift.get("warnings"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--per-group", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=120.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adaptation-") as tmp:
        result = measure(Path(tmp), args.per_group, args.seed, args.budget)
    _print(result)
    save_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
