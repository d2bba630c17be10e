"""Video as a modality (docs/video.md): clips made with PyAV here, decoded with PyAV in the
decode sandbox, their frames through the image encoder, pooled; their sound tracks as audio.

Malformed clips (truncated, zero bytes, garbage, a header and no frames, audio-only, a 4096x2160
frame, a declared ten-hour duration, a corrupted index) go through ingest and BatchProcessor in
one job: each ends as an item error with its reason, or succeeds where there is something to
use, and the job finishes.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from typing import Any

import av
import numpy as np
import pytest
import torch
from PIL import Image

from media.archive import walk
from media.decode import MediaError, modality_of
from media.sandbox import DecodeSandbox
from media.video import decode_sound_track, decode_video
from mmbatch.contract import MODALITIES, STRATEGIES, TrainOptions
from mmbatch.settings import Settings, SettingsError
from models.explain import explain
from models.fusion import FusionConfig
from models.registry import SPECS
from models.training import FeatureSet, TrainConfig, fit, predict
from models.video import frame_version
from samples.clips import audio_only, encode_clip, picture_clip
from store import features as feature_cache
from store import jobs
from store.blobs import BlobStore
from store.migrate import upgrade
from tests.util import tar_bytes
from worker.batch import BatchProcessor
from worker.ingest import ingest_job
from worker.runtime import Runtime


def _picture(seed: int = 0, size: tuple[int, int] = (160, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)  # big blocks: survives the codec
    return Image.fromarray(small).resize(size, Image.NEAREST)


def _tone(seconds: float, rate: int = 16000, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


# --- vocabulary, settings, ingest ---------------------------------------------------------------

def test_video_is_a_modality_with_its_settings() -> None:
    assert "video" in MODALITIES
    for name in ("a.mp4", "b.M4V", "c.mov", "d.WEBM", "e.mkv", "f.Avi"):
        assert modality_of(name) == "video"
    s = Settings.from_env({})
    assert (s.video_frames, s.video_too_long) == (8, "cut")
    s = Settings.from_env({"MMBATCH_VIDEO_FRAMES": "4", "MMBATCH_VIDEO_MAX_SECONDS": "12.5",
                           "MMBATCH_VIDEO_TOO_LONG": "fail", "MMBATCH_VIDEO_MAX_PIXELS": "1000"})
    assert (s.video_frames, s.video_max_seconds, s.video_too_long, s.video_max_pixels) == (
        4, 12.5, "fail", 1000)
    for env in ({"MMBATCH_VIDEO_FRAMES": "0"}, {"MMBATCH_VIDEO_FRAMES": "65"},
                {"MMBATCH_VIDEO_TOO_LONG": "skip"}, {"MMBATCH_VIDEO_MAX_SECONDS": "-1"},
                {"MMBATCH_VIDEO_MAX_PIXELS": "0"}):
        with pytest.raises(SettingsError, match="MMBATCH_VIDEO_"):
            Settings.from_env(env)
    # a clip's features are frozen image features pooled: no encoder mode of their own
    assert TrainOptions(mode="finetune").encoder_modes(["image", "video"]) == {
        "image": "finetune", "video": "frozen"}


def test_a_clip_pairs_with_its_caption_and_label_and_gives_its_sound(tmp_path) -> None:
    clip = picture_clip(_picture(), seconds=1.0)
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_bytes({"cat_001.MP4": clip, "cat_001.txt": b"a cat",
                              "dog_002.webm": clip, "dog_002.wav": b"RIFF....WAVE",
                              "labels.csv": b"key,label\ncat_001,cat\ndog_002,dog\n"}))
    result = walk(archive, BlobStore(tmp_path / "blobs").put_stream)
    cat, dog = result.items["cat_001"], result.items["dog_002"]
    assert set(cat) == {"video", "text", "audio"}
    assert cat["audio"] == {**cat["video"], "source": "video"}  # the clip's sound track
    assert dog["audio"]["name"] == "dog_002.wav" and "source" not in dog["audio"]
    assert result.labels["cat_001"].label == "cat"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_fuses_explains_and_classifies_a_clip_alone(strategy: str) -> None:
    torch.manual_seed(0)
    dims = {m: SPECS[m].dim for m in ("text", "audio", "video")}
    n = 32
    labels = torch.arange(n) % 2
    feats = {m: torch.randn(n, d) * 0.1 for m, d in dims.items()}
    feats["video"][:, 0] += labels * 2.0  # the clip carries the label
    mask = torch.ones(n, 3, dtype=torch.bool)
    mask[:8, :2] = False  # a clip and nothing else
    data = FeatureSet(feats, mask, labels)
    model, _ = fit(data, data, FusionConfig(input_dims=dims, num_classes=2, strategy=strategy),
                   TrainConfig(epochs=15, patience=15, seed=0))
    probs, _ = predict(model, {m: t[:8] for m, t in feats.items()}, mask[:8])
    assert (probs.argmax(1) == labels[:8]).float().mean() >= 0.75
    notes = explain(model, {m: t[:8] for m, t in feats.items()}, mask[:8])
    assert all(set(note["leave_one_out"]) == {"video"} for note in notes)


# --- decoding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["mp4", "mov", "webm", "mkv", "avi"])
def test_frames_are_sampled_over_the_clip_and_its_sound_is_read(fmt: str) -> None:
    rate = 48000 if fmt == "webm" else 16000
    data = picture_clip(_picture(), seconds=3.0, fps=8, fmt=fmt, audio=_tone(2.0, rate),
                        rate=rate)
    clip = decode_video(data, f"x.{fmt}", frames=4)
    times = [f.time for f in clip.frames]
    assert 3 <= len(times) <= 4 and times == sorted(times) and times[-1] - times[0] >= 1.5
    assert all(f.rgb.shape == (120, 160, 3) and f.rgb.dtype == np.uint8 for f in clip.frames)
    track = decode_sound_track(data, f"x.{fmt}", max_seconds=30.0)
    assert track.dtype == np.float32 and 1.8 * 16000 <= len(track) <= 2.2 * 16000


def test_a_fade_in_from_black_gives_no_black_frame() -> None:
    data = picture_clip(_picture(1), seconds=4.0, fps=8, fade_in=1.5)
    clip = decode_video(data, "fade.mp4", frames=8)
    assert clip.frames and min(f.time for f in clip.frames) >= 0.25  # the black opening skipped
    assert all(f.rgb.mean() > 24 for f in clip.frames)


def test_static_and_all_black_clips_still_give_a_frame() -> None:
    still = encode_clip([np.asarray(_picture(2))] * 16, fps=8)
    assert len(decode_video(still, "still.mp4", frames=8).frames) == 1  # the rest duplicates
    black = encode_clip([np.zeros((64, 64, 3), np.uint8)] * 8, fps=8)
    assert len(decode_video(black, "black.mp4", frames=4).frames) == 1


def test_variable_frame_rate_and_odd_pixel_formats() -> None:
    pictures = [np.asarray(_picture(i)) for i in range(8)]
    times = [0.0, 0.05, 0.1, 1.0, 2.5, 2.6, 3.9, 4.0]
    clip = decode_video(encode_clip(pictures, fmt="mkv", times=times), "vfr.mkv", frames=4)
    assert [round(f.time, 2) for f in clip.frames][-1] >= 2.5
    for pix in ("yuv444p", "yuv422p", "gray"):
        data = encode_clip(pictures, fmt="mkv", codec="libx264" if pix != "gray" else "ffv1",
                           pix_fmt=pix)
        frames = decode_video(data, f"{pix}.mkv", frames=3).frames
        assert frames and frames[0].rgb.shape == (120, 160, 3)


def test_rotation_metadata_is_applied() -> None:
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream: Any = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)  # a phone held upright: shown turned a quarter left
        for i in range(8):
            rgb = np.zeros((32, 64, 3), np.uint8)
            rgb[:, :32] = 200 + i * 5  # the left half bright
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    rgb = decode_video(out.getvalue(), "upright.mp4", frames=1).frames[0].rgb
    assert rgb.shape == (64, 32, 3)  # portrait, as a player shows it
    assert rgb[40:].mean() > 150 and rgb[:24].mean() < 40  # the left half turned to the bottom


def test_large_frames_come_out_small_and_too_large_ones_fail() -> None:
    big = [np.asarray(_picture(i, (1280, 720))) for i in range(4)]
    data = encode_clip(big, fps=4)
    frames = decode_video(data, "hd.mp4", frames=2).frames
    assert frames[0].rgb.shape == (256, 455, 3)  # the shorter side to 256, for the encoder
    with pytest.raises(MediaError, match=r"1280x720 frames are 921600 pixels, over the limit"):
        decode_video(data, "hd.mp4", max_pixels=640 * 480)
    # MJPEG decodes at half scale straight away (FFmpeg's lowres): the same frame size out
    mjpeg = decode_video(encode_clip(big, fmt="avi", fps=4), "hd.avi", frames=2).frames
    assert mjpeg[0].rgb.shape == (256, 455, 3)


def test_too_long_clips_are_cut_or_refused_by_setting() -> None:
    data = picture_clip(_picture(), seconds=6.0, fps=4)
    cut = decode_video(data, "long.mp4", frames=4, max_seconds=2.0)
    assert cut.frames and max(f.time for f in cut.frames) <= 2.0 and cut.info["cut_at"] == 2.0
    with pytest.raises(MediaError, match=r"over the limit of 2 s \(MMBATCH_VIDEO_MAX_SECONDS\)"):
        decode_video(data, "long.mp4", max_seconds=2.0, too_long="fail")


def test_the_sandbox_decodes_clips_like_the_module() -> None:
    data = picture_clip(_picture(), seconds=2.0, audio=_tone(1.0))
    with DecodeSandbox(processes=1, timeout=30) as sandbox:
        clip = sandbox.decode_video(data, "s.mp4", frames=4)
        here = decode_video(data, "s.mp4", frames=4)
        assert [f.time for f in clip.frames] == [f.time for f in here.frames]
        assert all(np.array_equal(a.rgb, b.rgb) for a, b in zip(clip.frames, here.frames))
        np.testing.assert_allclose(sandbox.decode_sound_track(data, "s.mp4"),
                                   decode_sound_track(data, "s.mp4"), atol=1e-6)
        with pytest.raises(MediaError) as absent:
            sandbox.decode_sound_track(picture_clip(_picture(), seconds=1.0), "silent.mp4")
        assert absent.value.kind == "absent"


# --- malformed clips through a job ---------------------------------------------------------------

def _ten_hours(data: bytes) -> bytes:
    """The clip with its movie header (mvhd) declaring ten hours."""
    at = data.index(b"mvhd") + 4
    version = data[at]
    assert version == 0
    timescale = struct.unpack(">I", data[at + 12:at + 16])[0]
    return data[:at + 16] + struct.pack(">I", timescale * 36000) + data[at + 20:]


def _corrupt_index(data: bytes) -> bytes:
    """The clip with its sample table's chunk offsets (stco) pointing past the file."""
    at = data.index(b"stco") + 4
    count = struct.unpack(">I", data[at + 4:at + 8])[0]
    bogus = b"".join(struct.pack(">I", 0xFFFFFF00 - i) for i in range(count))
    return data[:at + 8] + bogus + data[at + 8 + 4 * count:]


def _header_only(data: bytes) -> bytes:
    """The clip with its frame data (the mdat box's payload) zeroed: a header, no frames."""
    at = data.index(b"mdat") - 4
    size = struct.unpack(">I", data[at:at + 4])[0]
    return data[:at + 8] + bytes(size - 8) + data[at + size:]


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    data = tmp_path_factory.mktemp("video")
    settings = Settings.from_env({
        "MMBATCH_DATA_DIR": str(data), "MMBATCH_BROKER_URL": "memory://",
        "MMBATCH_BATCH_SIZE": "16", "MMBATCH_VIDEO_FRAMES": "3",
        "MMBATCH_DECODE_TIMEOUT_SECONDS": "30"})
    upgrade(settings.db_url)
    runtime = Runtime(settings)
    yield runtime
    runtime.close()


def _run(rt: Runtime, files: dict[str, bytes]) -> tuple[jobs.Job, dict[str, dict]]:
    digest = rt.blobs.put_bytes(tar_bytes(files))
    with rt.db.session() as s:
        job_id = jobs.create_job(s, kind="embed", archive_blob=digest, archive_name="v.tar",
                                 archive_bytes=1, model_version_id=None).id
    for batch in ingest_job(rt, job_id):
        BatchProcessor(rt, job_id, batch).run()
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        s.expunge(job)
        results = {item.key: {"status": result.status, "error": result.error,
                              "info": result.info or {}}
                   for item, result in jobs.results_page(s, job, after=0, limit=100)}
    return job, results


MALFORMED_OUTCOMES = {
    # file -> how it ends (a prefix of the item's error, or "ok" and what the item got)
    "zero.mp4": "skipped: empty file (0 bytes)",
    "garbage.mp4": "video bad/garbage.mp4: cannot decode (not an MP4, MOV, WebM, Matroska or AVI "
                   "file)",
    "truncated.mp4": "video bad/truncated.mp4: cannot decode (truncated or corrupt: ",
    "header_only.mp4": "video bad/header_only.mp4: no frame could be decoded (truncated or "
                       "corrupt video data",
    "audio_only.mp4": "ok: audio from the clip, no video",
    "dci4k.mkv": "video bad/dci4k.mkv: 4096x2160 frames are 8847360 pixels, over the limit of "
                 "8294400 (MMBATCH_VIDEO_MAX_PIXELS)",
    "ten_hours.mp4": "ok: video and audio (the frames that are there)",
    # the first track's chunk offsets point past the file: its sound is lost, its pictures not
    "corrupt_index.mp4": "ok: video, no audio",
}


def test_malformed_clips_end_as_item_errors_or_succeed_and_the_job_finishes(rt: Runtime) -> None:
    good = picture_clip(_picture(3), seconds=2.0, audio=_tone(1.5))
    silent = picture_clip(_picture(4), seconds=2.0)
    dci = encode_clip([np.zeros((2160, 4096, 3), np.uint8) + 90], fmt="mkv", fps=1)
    files = {
        "good/clip.mp4": good, "good/clip.txt": b"a moving picture",
        "silent/clip.mov": silent,
        "bad/zero.mp4": b"",
        "bad/garbage.mp4": np.random.default_rng(0).bytes(4000),
        "bad/truncated.mp4": good[: len(good) // 3],
        "bad/header_only.mp4": _header_only(good),
        "bad/audio_only.mp4": audio_only(_tone(1.0)),
        "bad/dci4k.mkv": dci,
        "bad/ten_hours.mp4": _ten_hours(good),
        "bad/corrupt_index.mp4": _corrupt_index(good),
        "image/a.png": _png_bytes(),
    }
    job, results = _run(rt, files)
    assert job.state == "succeeded"
    assert job.total == len(results) == 11 - 1  # the empty file is skipped at ingest
    assert {x["name"]: x["reason"] for x in job.report["skipped"]} == {
        "bad/zero.mp4": "empty file (0 bytes)"}
    assert results["good/clip"]["status"] == "ok"
    assert results["good/clip"]["info"]["audio_source"] == "video"
    assert results["silent/clip"] == {"status": "ok", "error": None,
                                      "info": {"absent": ["audio"]}}
    assert results["image/a"]["status"] == "ok"
    table = {}
    for name, expected in MALFORMED_OUTCOMES.items():
        key = "bad/" + name.rsplit(".", 1)[0]
        if key not in results:
            table[name] = "skipped"
            continue
        r = results[key]
        table[name] = r["error"] if r["status"] == "failed" else f"ok {r['info']}"
    print("\n" + "\n".join(f"{k}: {v}" for k, v in table.items()))
    for name, expected in MALFORMED_OUTCOMES.items():
        r = results.get("bad/" + name.rsplit(".", 1)[0])
        if expected.startswith("ok"):
            assert r is not None and r["status"] == "ok", (name, r)
        elif not expected.startswith("skipped"):
            assert r is not None and r["status"] == "failed", (name, r)
            assert r["error"].startswith(expected), (name, r)
    assert results["bad/audio_only"]["info"] == {"audio_source": "video", "absent": ["video"]}
    assert results["bad/corrupt_index"]["info"] == {"absent": ["audio"]}
    # cached: the clip's pooled features, its sound track's, and each sampled frame's by time
    digest = rt.blobs.put_bytes(good)
    with rt.db.session() as s:
        assert feature_cache.get_features(s, SPECS["video"].version, [digest])[digest].shape == (
            2560,)
        assert digest in feature_cache.get_features(s, SPECS["audio"].version, [digest])
        frames = [t for t in np.arange(0, 2.0, 0.125)
                  if digest in feature_cache.get_features(s, frame_version(float(t)), [digest])]
    assert 2 <= len(frames) <= 3


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    _picture(5).save(buf, "PNG")
    return buf.getvalue()
