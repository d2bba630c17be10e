"""Decoding ahead of the model (worker.encoding): order, bounds, per-item errors, chunking."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from media.decode import MediaError
from worker.encoding import MediaRef, encode_media, prefetch


@pytest.fixture()
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as p:
        yield p


def test_prefetch_keeps_input_order_when_later_items_finish_first(
        pool: ThreadPoolExecutor) -> None:
    def slow_first(x: int) -> int:
        time.sleep(0.02 * (5 - x))
        return x * 10

    got = [(p.source, p.value) for p in prefetch(pool, slow_first, range(5), depth=5)]
    assert got == [(i, i * 10) for i in range(5)]


@pytest.mark.parametrize("inline", [True, False])
def test_prefetch_yields_an_items_error_and_goes_on(pool: ThreadPoolExecutor,
                                                    inline: bool) -> None:
    def fn(x: int) -> int:
        if x == 2:
            raise MediaError("image x.jpg: truncated")
        return x

    out = list(prefetch(None if inline else pool, fn, range(4), depth=2))
    assert [p.source for p in out] == [0, 1, 2, 3]
    assert [p.value for p in out if p.error is None] == [0, 1, 3]
    assert isinstance(out[2].error, MediaError) and "truncated" in str(out[2].error)


def test_prefetch_runs_at_most_depth_ahead(pool: ThreadPoolExecutor) -> None:
    started: list[int] = []
    lock = threading.Lock()

    def fn(x: int) -> int:
        with lock:
            started.append(x)
        return x

    stream = prefetch(pool, fn, range(100), depth=3)
    first = next(stream)
    time.sleep(0.05)
    assert first.source == 0
    assert max(started) <= 3  # 0 taken, 1-3 in flight: never the whole input at once
    stream.close()


def test_prefetch_rejects_a_zero_depth() -> None:
    with pytest.raises(ValueError):
        list(prefetch(None, lambda x: x, [1], depth=0))


class FakeEncoder:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.chunks: list[list[Any]] = []

    def encode(self, items: list[Any]) -> torch.Tensor:
        self.chunks.append(list(items))
        return torch.tensor([[float(v)] * self.dim for v in items])


def test_encode_media_groups_by_modality_chunks_by_batch_size_and_fails_files_alone(
        pool: ThreadPoolExecutor) -> None:
    encoders = {"image": FakeEncoder(2), "text": FakeEncoder(3)}
    refs = [MediaRef("text", "t1", "a.txt"), MediaRef("image", "i1", "a.jpg"),
            MediaRef("image", "i2", "b.jpg"), MediaRef("image", "bad", "c.jpg"),
            MediaRef("image", "bug", "d.jpg"), MediaRef("image", "i3", "e.jpg"),
            MediaRef("text", "t1", "a.txt")]  # the same file twice: encoded once
    values = {"t1": 7, "i1": 1, "i2": 2, "i3": 3}

    def prepare(ref: MediaRef) -> int:
        if ref.blob == "bad":
            raise MediaError("image c.jpg: cannot identify image file")
        if ref.blob == "bug":
            raise KeyError("oops")
        return values[ref.blob]

    result = encode_media(refs, prepare=prepare, encoder=encoders.__getitem__,
                          batch_sizes={"image": 2, "text": 8}, pool=pool, depth=2)
    assert encoders["image"].chunks == [[1, 2], [3]]  # in chunks of 2, after the text
    assert encoders["text"].chunks == [[7]]
    assert result.vectors[("image", "i3")].tolist() == [3.0, 3.0]
    assert result.vectors[("text", "t1")].dtype.str == "<f4"
    assert result.errors == {
        ("image", "bad"): "image c.jpg: cannot identify image file",
        ("image", "bug"): "image d.jpg: cannot decode (KeyError: 'oops')",
    }


def test_an_encoder_failure_is_not_a_files_fault() -> None:
    class Broken:
        def encode(self, items: list[Any]) -> torch.Tensor:
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        encode_media([MediaRef("text", "t", "t.txt")], prepare=lambda r: "x",
                      encoder=lambda m: Broken(), batch_sizes={"text": 4}, pool=None, depth=1)


def test_runtime_decodes_inline_unless_a_core_is_free(tmp_path: Any) -> None:
    import os

    from mmbatch.settings import Settings
    from store.blobs import BlobStore
    from worker.model_cache import ModelCache

    threads = torch.get_num_threads()  # keep this process's own count
    env = {"MMBATCH_DATA_DIR": str(tmp_path), "MMBATCH_DEVICE": "cpu",
           "MMBATCH_TORCH_THREADS": str(threads)}
    models = ModelCache(Settings.from_env(env), BlobStore(tmp_path))
    assert models.decode_threads == max(0, min(8, (os.cpu_count() or 1) - threads))
    models.close()
    models = ModelCache(Settings.from_env({**env, "MMBATCH_DECODE_THREADS": "0"}),
                        BlobStore(tmp_path))
    assert models.pool is None
    models.close()
    models = ModelCache(Settings.from_env({**env, "MMBATCH_DECODE_THREADS": "2"}),
                        BlobStore(tmp_path))
    assert models.pool is not None and models.pool._max_workers == 2
    models.close()
