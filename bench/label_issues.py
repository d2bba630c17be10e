"""How well a train job finds planted wrong labels, and what correcting them gives back.

On the sample and on the far sample, 10 % of the training labels are flipped to another class
(seeded, ``samples.noise``). A train job on the noisy archive lists its label issues; of the first
N (N = the number flipped) this prints the share of the flips found (recall) and the share that
were flips (precision). It then trains twice more, on the noisy archive with the found flips
corrected (what a reviewer who accepts the true label does) and on the clean archive, and prints
validation accuracy and macro F1 of all three and the share of the noisy-to-clean gap the
corrections recover.

The three jobs of one sample are judged on the same validation items, whose labels are never
flipped: the sample's labels.csv names its split; the far sample has none (a train job draws a
group-disjoint one, from the labels, which noise would move, and flips would land in it), so the
split a train job draws for the clean far archive is written into its labels.csv first.

Everything runs in this process, as a worker would run it: ingest, batches through the real
encoders, training; the second and third train jobs reuse the cached features.

    python -m bench.label_issues [--n-train 320] [--per-group 48] [--share 0.1] [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import save_json
from mmbatch.settings import Settings
from models.training import choose_split
from samples.far_sample import write_far_sample
from samples.noise import flip_labels, read_labels
from samples.sample import write_sample
from store import keys
from store.migrate import upgrade
from web.app import create_app
from worker.batch import BatchProcessor
from worker.ingest import ingest_job
from worker.runtime import Runtime
from worker.training import train_job


class InProcess:
    """The API app and the worker's functions over one embedded runtime."""

    def __init__(self, data_dir: Path) -> None:
        settings = Settings.from_env({"MMBATCH_DATA_DIR": str(data_dir),
                                      "MMBATCH_BROKER_URL": "memory://"})
        upgrade(settings.db_url)
        self.rt = Runtime(settings)
        with self.rt.db.session() as s:
            key = keys.create_key(s, "bench").key
        app = create_app(self.rt.settings)
        app.extensions["mmbatch"].celery.send_task = lambda *a, **kw: None
        self.client = app.test_client()
        self.headers = {"Authorization": f"Bearer {key}"}

    def get(self, path: str) -> Any:
        return self.client.get(path, headers=self.headers).get_json()

    def train(self, archive: Path, epochs: int) -> dict[str, Any]:
        with open(archive, "rb") as f:
            r = self.client.post("/api/v1/jobs", headers=self.headers,
                                 data={"kind": "train", "archive": (f, archive.name),
                                       "epochs": str(epochs)})
        job_id = r.get_json()["id"]
        for ids in ingest_job(self.rt, job_id):
            if BatchProcessor(self.rt, job_id, ids).run().next_step == "train":
                train_job(self.rt, job_id)
        job = self.get(f"/api/v1/jobs/{job_id}")
        if job["state"] != "succeeded":
            raise SystemExit(f"train job {job_id} {job['state']}: {job['error']}")
        return self.get(f"/api/v1/models/{job['model']['id']}")  # type: ignore[no-any-return]

    def issues(self, model_id: int) -> list[dict[str, Any]]:
        return self.get(f"/api/v1/models/{model_id}/label-issues?limit=1000")["issues"]


def finding(issues: list[dict[str, Any]], flipped: dict[str, tuple[str, str]]
            ) -> dict[str, Any]:
    top = [i["key"] for i in issues[:len(flipped)]]
    hits = sum(1 for k in top if k in flipped)
    return {"flipped": len(flipped), "listed": len(issues), "found_in_top_n": hits,
            "recall_at_n": round(hits / max(1, len(flipped)), 3),
            "precision_at_n": round(hits / max(1, len(top)), 3)}


def scores(model: dict[str, Any]) -> dict[str, Any]:
    m = model["metrics"]
    return {"val_accuracy": m.get("val_accuracy"), "val_macro_f1": m.get("val_macro_f1")}


def close_the_loop(run: InProcess, clean: Path, work: Path, share: float, seed: int,
                   epochs: int) -> dict[str, Any]:
    """Flip ``share`` of ``clean``'s training labels, train, find, correct what was found,
    train on the corrected and on the clean archive: the finding and the three models' scores."""
    t0 = time.perf_counter()
    noisy = work / f"{clean.stem}.noisy.tar.gz"
    flipped = flip_labels(clean, noisy, share, seed=seed)
    model = run.train(noisy, epochs)
    issues = run.issues(model["id"])
    found = finding(issues, flipped)
    fixes = {i["key"]: flipped[i["key"]][0] for i in issues[:len(flipped)]
             if i["key"] in flipped}
    corrected = work / f"{clean.stem}.corrected.tar.gz"
    flip_labels(clean, corrected, share, seed=seed, fix=fixes)
    trained = {"noisy": scores(model),
               "corrected": scores(run.train(corrected, epochs)),
               "clean": scores(run.train(clean, epochs))}
    gap = {}
    for metric in ("val_accuracy", "val_macro_f1"):
        lost = trained["clean"][metric] - trained["noisy"][metric]
        back = trained["corrected"][metric] - trained["noisy"][metric]
        # None: the noise cost nothing on validation, so there was no gap to recover
        gap[metric] = round(back / lost, 3) if lost > 1e-9 else None
    return {**found, "val_items": model["metrics"].get("val_size"), "trained": trained,
            "gap_recovered": gap, "seconds": round(time.perf_counter() - t0, 1)}


def with_fixed_split(run: InProcess, archive: Path, target: Path) -> Path:
    """``archive`` (no split of its own) with the split a train job draws for it written into
    its labels.csv: the same validation items for every job, whatever labels are flipped."""
    rows = read_labels(archive)
    _, val_idx, _ = choose_split([r["label"] for r in rows], [None] * len(rows),
                                 [r.get("group") or None for r in rows],
                                 run.rt.settings.train_seed)
    flip_labels(archive, target, 0.0, val={rows[i]["key"] for i in val_idx})
    return target


def report(name: str, result: dict[str, Any]) -> None:
    found = {k: result[k] for k in ("flipped", "listed", "found_in_top_n", "recall_at_n",
                                    "precision_at_n")}
    print(f"{name}: {found}")
    for trained, s in result["trained"].items():
        print(f"  trained on {trained:9s} labels: val accuracy {s['val_accuracy']:.3f}  "
              f"macro F1 {s['val_macro_f1']:.3f}  ({result['val_items']} validation items)")
    print(f"  share of the noisy-to-clean gap the corrections recover: "
          f"{result['gap_recovered']}  ({result['seconds']} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=320)
    parser.add_argument("--per-group", type=int, default=48, help="far sample items per group")
    parser.add_argument("--share", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out: dict[str, Any] = {"share": args.share, "seed": args.seed}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = InProcess(work / "data")
        clean = write_sample(work / "sample", n_train=args.n_train, n_unlabelled=8,
                             seed=args.seed).train
        out["sample"] = {"items": args.n_train,
                         **close_the_loop(run, clean, work, args.share, args.seed, args.epochs)}
        report(f"sample ({args.n_train} items)", out["sample"])
        far = with_fixed_split(run, write_far_sample(work / "far", per_group=args.per_group,
                                                     seed=args.seed),
                               work / "far_clean.tar.gz")
        out["far_sample"] = {"items": len(read_labels(far)),
                             **close_the_loop(run, far, work, args.share, args.seed,
                                              args.epochs)}
        report(f"far sample ({out['far_sample']['items']} items)", out["far_sample"])
        run.rt.close()
    save_json(args.json, out)


if __name__ == "__main__":
    main()
