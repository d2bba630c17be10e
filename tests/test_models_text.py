"""MiniLM text encoder on its real weights."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.registry import SPECS, build_encoder
from models.text import TextEncoder, default_model_path

SENTENCES = [
    "A cat sits on the mat.",
    "A kitten is sitting on a rug.",
    "Quarterly revenue grew by four percent.",
    "",
    "The stock market rallied after the earnings report, lifting technology shares.",
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    enc = build_encoder("text")
    assert isinstance(enc, TextEncoder)
    return enc


@pytest.fixture(scope="module")
def embeddings(encoder: TextEncoder) -> torch.Tensor:
    return encoder.encode([encoder.preprocess(s) for s in SENTENCES])


def test_encoder_is_frozen(encoder: TextEncoder) -> None:
    assert encoder.spec == SPECS["text"]
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_shape_and_unit_norm(embeddings: torch.Tensor) -> None:
    assert embeddings.shape == (len(SENTENCES), 384) and embeddings.dtype == torch.float32
    torch.testing.assert_close(
        embeddings.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-5, rtol=0
    )


def test_similar_sentences_are_closer(embeddings: torch.Tensor) -> None:
    cos = embeddings @ embeddings.T
    assert cos[0, 1] > 0.5
    assert cos[0, 1] > cos[0, 2] + 0.3
    assert cos[2, 4] > cos[0, 2]  # both about business


def test_stored_reference(embeddings: torch.Tensor) -> None:
    expected = torch.tensor([0.126535, -0.032851, -0.029060, 0.044407, -0.043445, 0.032097])
    torch.testing.assert_close(embeddings[0, :6], expected, atol=1e-4, rtol=0)


def test_matches_sentence_transformers(embeddings: torch.Tensor) -> None:
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(default_model_path()), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(embeddings, expected.float().cpu(), atol=1e-5, rtol=0)


def test_bucketing_keeps_input_order(encoder: TextEncoder, embeddings: torch.Tensor) -> None:
    small = TextEncoder(max_batch=2)
    small.model = encoder.model  # same weights, smaller buckets
    torch.testing.assert_close(small.encode(SENTENCES), embeddings, atol=1e-5, rtol=0)
    one_by_one = torch.cat([encoder.encode([s]) for s in SENTENCES])
    torch.testing.assert_close(one_by_one, embeddings, atol=1e-5, rtol=0)


def test_preprocess_and_edge_cases(encoder: TextEncoder) -> None:
    assert encoder.preprocess("  a\tcat \n\n sits ") == "a cat sits"
    assert encoder.preprocess("") == ""
    with pytest.raises(TypeError):
        encoder.preprocess(None)  # type: ignore[arg-type]
    long_text = " ".join(["word"] * 2000)  # truncated to 256 tokens, not an error
    assert encoder.encode([long_text]).shape == (1, 384)
    assert encoder.encode([]).shape == (0, 384)
