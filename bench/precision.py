"""Does bf16 keep accuracy? Each encoder in fp32 against bf16 autocast, on the same inputs.

    python -m bench.precision [--items 64] [--out var/bench/precision.json]

For the image encoder: ImageNet top-1 agreement and top-5 overlap of the logits, and cosine of
the 1280-d features, on natural photos (scikit-image's sample images, when installed) and on the
bench's synthetic photos, against the network as published (fp32, BatchNorm not folded); for
text and audio: cosine of the features. It also times both
precisions at the worker's batch sizes. ``precision="auto"`` uses bf16 only for the encoders
whose ``PREFERRED_PRECISION`` says so, and this is the evidence for each choice. bf16 is kept
where the worst feature cosine is at least 0.99 and, for images, ImageNet top-1 agrees on at
least 95% of natural photos with every disagreement a near-tie in fp32 (its two best classes
within 5 points of probability): a flip there is rounding, not a different answer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import synth
from media import decode as media

TOP1_MIN = 0.95
FLIP_MARGIN_MAX = 0.05
COSINE_MIN = 0.99


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "camera", "motorcycle_left")


def natural_images() -> list[Any]:
    """Photos that ship with installed packages (scikit-image, scikit-learn, matplotlib), each
    as 9 overlapping crops and their mirror images: ~180 natural images, no download."""
    from PIL import Image, ImageOps

    photos: list[Any] = []
    try:
        from skimage import data

        for name in PHOTOS:
            try:
                photos.append(Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB"))
            except Exception:  # noqa: BLE001, S112 - some need a download (pooch): skip those
                continue
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        photos += [Image.fromarray(a).convert("RGB") for a in load_sample_images().images]
    except ImportError:
        pass
    try:
        import matplotlib.cbook

        path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        photos.append(Image.open(str(path)).convert("RGB"))
    except (ImportError, OSError, ValueError):
        pass
    out = []
    for img in photos:
        w, h = img.size
        cw, ch = int(w * 0.7), int(h * 0.7)
        for i in range(3):
            for j in range(3):
                left, top = (w - cw) * i // 2, (h - ch) * j // 2
                crop = img.crop((left, top, left + cw, top + ch))
                out += [crop, ImageOps.mirror(crop)]
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).numpy()


def _timed(fn: Any, repeats: int = 3) -> float:
    fn()  # kernels for these shapes
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def compare(items: int, batch_sizes: dict[str, int]) -> dict[str, Any]:
    from models.registry import build_encoder

    built: dict[tuple[str, str], Any] = {
        (m, p): build_encoder(m, "cpu", precision=p, max_batch=batch_sizes[m])
        for m in ("image", "text", "audio") for p in ("fp32", "bf16")}
    # The image reference is the network as published: fp32, BatchNorm not folded.
    built[("image", "fp32")] = build_encoder("image", "cpu", precision="fp32", fold_bn=False,
                                             max_batch=batch_sizes["image"])
    unfolded_bf16: Any = build_encoder("image", "cpu", precision="bf16", fold_bn=False,
                                       max_batch=batch_sizes["image"])
    made = [synth.make_item(7, i)[1] for i in range(items)]
    out: dict[str, Any] = {}

    # image
    fp32, bf16 = built[("image", "fp32")], built[("image", "bf16")]
    sets = {"synthetic": [media.decode_image(f[".jpg"], "x.jpg") for f in made],
            "natural": natural_images()}
    image: dict[str, Any] = {}
    for name, imgs, other in (("synthetic", sets["synthetic"], bf16),
                              ("natural", sets["natural"], bf16),
                              ("natural, bf16 without BatchNorm folding", sets["natural"],
                               unfolded_bf16)):
        if not imgs:
            continue
        x = torch.stack([fp32.preprocess(i) for i in imgs])  # (N, 3, 224, 224)
        la, lb = fp32.logits(x), other.logits(x)
        ta, tb = la.topk(5, dim=1).indices, lb.topk(5, dim=1).indices
        fa, fb = fp32.encode(list(x)), other.encode(list(x))
        cos = cosine(fa, fb)
        probs = la.softmax(dim=1).topk(2, dim=1).values  # (N, 2) fp32's two best
        margin = (probs[:, 0] - probs[:, 1]).numpy()
        flipped = (ta[:, 0] != tb[:, 0]).numpy()
        image[name] = {
            "images": len(imgs),
            "top1_agreement": round(float((ta[:, 0] == tb[:, 0]).float().mean()), 4),
            # A flip where fp32's two best classes are nearly tied is rounding, not a loss.
            "largest_fp32_margin_of_a_flip": round(float(margin[flipped].max()), 4)
            if flipped.any() else None,
            "fp32_top1_probability_median": round(float(np.median(probs[:, 0].numpy())), 3),
            "top5_overlap": round(float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 5
                                                 for a, b in zip(ta, tb)])), 4),
            "feature_cosine_min": round(float(cos.min()), 5),
            "feature_cosine_mean": round(float(cos.mean()), 5)}
    batch = [fp32.preprocess(i) for i in sets["synthetic"]]
    image["ms_per_item"] = {p: round(_timed(lambda e=built[("image", p)]: e.encode(batch))
                                     / len(batch) * 1e3, 2) for p in ("fp32", "bf16")}
    out["image"] = image

    # text
    texts = [media.decode_text(f[".txt"], "x.txt") for f in made] + [
        "A cat sleeps on a warm windowsill in the afternoon sun.",
        "The quarterly report shows revenue growth across all regions.",
        "Heavy rain is expected tonight with strong winds along the coast."]
    fa, fb = built[("text", "fp32")].encode(texts), built[("text", "bf16")].encode(texts)
    cos = cosine(fa, fb)
    out["text"] = {"texts": len(texts), "feature_cosine_min": round(float(cos.min()), 5),
                   "feature_cosine_mean": round(float(cos.mean()), 5),
                   "ms_per_item": {p: round(_timed(lambda e=built[("text", p)]: e.encode(texts))
                                            / len(texts) * 1e3, 2) for p in ("fp32", "bf16")}}

    # audio
    enc = built[("audio", "fp32")]
    mels = [enc.preprocess(media.decode_audio(f[".wav"], "x.wav")) for f in made]
    fa, fb = enc.encode(mels), built[("audio", "bf16")].encode(mels)
    cos = cosine(fa, fb)
    cnn = cosine(fa[:, :128], fb[:, :128])
    out["audio"] = {"clips": len(mels), "feature_cosine_min": round(float(cos.min()), 5),
                    "cnn_part_cosine_min": round(float(cnn.min()), 5),
                    "ms_per_item": {p: round(_timed(lambda e=built[("audio", p)]: e.encode(mels))
                                             / len(mels) * 1e3, 2) for p in ("fp32", "bf16")}}
    for modality in ("image", "text", "audio"):
        out[modality]["bf16_keeps_accuracy"] = keeps_accuracy(out[modality])
    return out


def keeps_accuracy(result: dict[str, Any]) -> bool:
    checks = [v for v in result.values() if isinstance(v, dict) and "feature_cosine_min" in v]
    checks.append(result)
    ok = True
    for c in checks:
        if "feature_cosine_min" in c and c["feature_cosine_min"] < COSINE_MIN:
            ok = False
        if "top1_agreement" in c and c["top1_agreement"] < TOP1_MIN:
            ok = False
        if (c.get("largest_fp32_margin_of_a_flip") or 0.0) > FLIP_MARGIN_MAX:
            ok = False
    return ok


def main() -> None:
    from mmbatch.settings import Settings
    from models.device import bf16_supported

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("var/bench/precision.json"))
    args = parser.parse_args()
    if not bf16_supported(torch.device("cpu")):
        print("this CPU has no native bf16: precision=auto runs everything in fp32")
    s = Settings.from_env({})
    result = compare(args.items, {"image": s.image_batch_size, "text": s.text_batch_size,
                                  "audio": s.audio_batch_size})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
