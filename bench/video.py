"""Video: what clips cost and what they are worth (docs/video.md).

Throughput: clips of 480p, 720p and 1080p (4 s, 25 fps, H.264, a keyframe every 2 s) end to
end through what a batch does with a clip (decode in the sandbox, preprocess the sampled
frames, the image encoder over them in its batches, pooling): clips/s, decoded frames/s, and the
share of the time spent decoding. Accuracy: the same sample items two ways, a train job and a
classify job on separate image + audio files, and on the same pictures and sounds as clips; and
the far sample's glyphs as PNGs against as clips (validation accuracy, split by group).

    python -m bench.video [--items 96] [--clips 6]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.adaptation_report import run_job
from media.sandbox import DecodeSandbox
from mmbatch.settings import Settings
from models.registry import build_encoder
from models.video import pool_frames
from samples.clips import encode_clip
from samples.far_sample import write_far_sample
from samples.sample import write_sample
from store import jobs
from store.migrate import upgrade
from store.registry import get_model
from worker.runtime import Runtime

SIZES = {"480p": (854, 480), "720p": (1280, 720), "1080p": (1920, 1080)}


def moving_frames(size: tuple[int, int], seconds: float = 4.0, fps: int = 25,
                  seed: int = 0) -> list[np.ndarray]:
    """A textured picture panning across the frame, with noise: what a camera clip looks like
    to a codec (no two frames alike)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = Image.fromarray(rng.integers(0, 255, (h // 16 + 2, w // 16 + 8, 3), dtype=np.uint8))
    big = np.asarray(base.resize((w + 128, h + 32), Image.Resampling.BILINEAR), dtype=np.int16)
    frames = []
    for i in range(round(seconds * fps)):
        x = i * 128 // round(seconds * fps)
        frame = big[16:16 + h, x:x + w] + rng.integers(-6, 7, (h, w, 3), dtype=np.int16)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return frames


def throughput(clips: int = 6, frames: int = 8, settings: Settings | None = None
               ) -> dict[str, Any]:
    """Per size: clips/s and decoded frames/s end to end (sandboxed decode, preprocessing, the
    image encoder, pooling, run one clip after another as one decode thread feeds the encoder),
    and the share of the time spent decoding."""
    settings = settings or Settings.from_env()
    encoder = build_encoder("image", precision=settings.precision,
                            max_batch=settings.image_batch_size)
    out: dict[str, Any] = {}
    with DecodeSandbox(processes=1, timeout=120) as sandbox:
        for label, size in SIZES.items():
            data = [encode_clip(moving_frames(size, seed=i), fps=25, gop=50)
                    for i in range(clips)]
            sandbox.decode_video(data[0], "warm.mp4", frames=frames)  # the child starts
            encoder.encode([encoder.preprocess(Image.new("RGB", (320, 240)))])
            decode_s = encode_s = 0.0
            decoded = sampled = 0
            for i, clip_bytes in enumerate(data):
                started = time.perf_counter()
                clip = sandbox.decode_video(clip_bytes, f"{label}_{i}.mp4", frames=frames)
                mid = time.perf_counter()
                inputs = [encoder.preprocess(Image.fromarray(f.rgb)) for f in clip.frames]
                feats = encoder.encode(inputs).numpy()
                pool_frames(feats)
                encode_s += time.perf_counter() - mid
                decode_s += mid - started
                decoded += int(clip.info.get("decoded", 0))
                sampled += len(clip.frames)
            total = decode_s + encode_s
            out[label] = {"clips": clips, "bytes_per_clip": sum(map(len, data)) // clips,
                          "clips_per_s": round(clips / total, 2),
                          "decoded_frames_per_s": round(decoded / decode_s, 1),
                          "frames_decoded_per_clip": round(decoded / clips, 1),
                          "frames_sampled_per_clip": round(sampled / clips, 1),
                          "decode_share": round(decode_s / total, 3),
                          "decode_ms_per_clip": round(1000 * decode_s / clips, 1),
                          "encode_ms_per_clip": round(1000 * encode_s / clips, 1)}
    return out


def _runtime(data_dir: Path, **env: str) -> Runtime:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(data_dir),
                                  "MMBATCH_BROKER_URL": "memory://", **env})
    upgrade(settings.db_url)
    return Runtime(settings)


def _accuracy(rt: Runtime, job_id: str, truth: Path) -> tuple[float, int, dict[str, int]]:
    labels = {row["key"]: row["label"] for row in csv.DictReader(truth.open())}
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        rows = jobs.results_page(s, job, after=0, limit=100_000)
        got = {item.key: (result.label if result is not None else None, sorted(item.media))
               for item, result in rows}
    right = sum(label == labels[key] for key, (label, _) in got.items())
    kinds: dict[str, int] = {}
    for _, media in got.values():
        kinds["+".join(media)] = kinds.get("+".join(media), 0) + 1
    return right / len(labels), len(got), kinds


def clips_against_files(data_dir: Path, n_train: int = 64, n_unlabelled: int = 64,
                        seed: int = 0, epochs: int = 60, frames: int = 4,
                        strategy: str = "concat") -> dict[str, Any]:
    """Train on the sample's items as separate image + audio files and classify such files;
    then train on the same items with each picture and sound as one clip and classify clips.
    Accuracy on the unlabelled items both ways."""
    out: dict[str, Any] = {"n_train": n_train, "n_unlabelled": n_unlabelled, "seed": seed,
                           "frames": frames, "strategy": strategy, "epochs": epochs}
    for way, clips in (("files", 0.0), ("clips", 1.0)):
        paths = write_sample(data_dir / f"sample_{way}", n_train=n_train,
                             n_unlabelled=n_unlabelled, seed=seed, fmt="tar", clips=clips)
        rt = _runtime(data_dir / f"rt_{way}", MMBATCH_BATCH_SIZE="64",
                      MMBATCH_VIDEO_FRAMES=str(frames))
        try:
            started = time.perf_counter()
            train = run_job(rt, paths.train, "train",
                            options={"name": way, "epochs": epochs, "seed": seed,
                                     "strategy": strategy})
            with rt.db.session() as s:
                job = jobs.get_job(s, train)
                if job.state != "succeeded" or job.model_version_id is None:
                    raise RuntimeError(f"{way}: train job {job.state}: {job.error}")
                model = job.model_version_id
            classify = run_job(rt, paths.unlabelled, "classify", model=model)
            accuracy, items, kinds = _accuracy(rt, classify, paths.truth)
            out[way] = {"accuracy": round(accuracy, 4), "items": items, "media": kinds,
                        "seconds": round(time.perf_counter() - started, 1)}
        finally:
            rt.close()
    out["difference_points"] = round(100 * (out["clips"]["accuracy"]
                                            - out["files"]["accuracy"]), 2)
    return out


def far_clips_against_files(data_dir: Path, per_group: int = 24, seed: int = 0,
                            epochs: int = 60, frames: int = 4) -> dict[str, Any]:
    """The far sample (glyphs and words, samples.far_sample) two ways: its images as PNGs, and
    as one-second clips of them; a train job each way with its validation split held out by
    group, and the model's validation accuracy."""
    out: dict[str, Any] = {"per_group": per_group, "seed": seed, "frames": frames}
    for way, clips in (("files", False), ("clips", True)):
        path = write_far_sample(data_dir / f"far_{way}", per_group=per_group, seed=seed,
                                clips=clips)
        rt = _runtime(data_dir / f"far_rt_{way}", MMBATCH_BATCH_SIZE="64",
                      MMBATCH_VIDEO_FRAMES=str(frames))
        try:
            job_id = run_job(rt, path, "train", options={"name": f"far-{way}", "epochs": epochs,
                                                         "seed": seed})
            with rt.db.session() as s:
                job = jobs.get_job(s, job_id)
                if job.state != "succeeded" or job.model_version_id is None:
                    raise RuntimeError(f"far {way}: train job {job.state}: {job.error}")
                metrics = dict(get_model(s, job.model_version_id).metrics)
            out[way] = {"val_accuracy": round(float(metrics["val_accuracy"]), 4),
                        "val_items": metrics.get("val_items")}
        finally:
            rt.close()
    out["difference_points"] = round(100 * (out["clips"]["val_accuracy"]
                                            - out["files"]["val_accuracy"]), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.video")
    parser.add_argument("--items", type=int, default=96, help="train and unlabelled items each")
    parser.add_argument("--clips", type=int, default=6, help="clips per size for throughput")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = {"throughput": throughput(args.clips)}
    print(json.dumps(report, indent=2), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report["accuracy"] = clips_against_files(Path(tmp), args.items, args.items, args.seed)
        print(json.dumps(report["accuracy"], indent=2), flush=True)
        report["far_accuracy"] = far_clips_against_files(Path(tmp), seed=args.seed)
        print(json.dumps(report["far_accuracy"], indent=2))


if __name__ == "__main__":
    main()
