"""The LLaVA-layout VLM against transformers' LlavaForConditionalGeneration on a tiny random
checkpoint written here: logits within 1e-4, greedy tokens equal, preprocessing equal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from sorai.model.llava import load_llava, preprocess

transformers = pytest.importorskip("transformers")

IMAGE_TOKEN = 5
SIZE, PATCH = 28, 14  # 4 patches: 4 image tokens per image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, object]:
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=SIZE, patch_size=PATCH, projection_dim=32,
    )  # fmt: skip
    text = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False,
    )  # fmt: skip
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN
    )
    reference = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init leaves some weights at zero; make every one count
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("llava")
    reference.save_pretrained(path)
    return path, reference


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[1, 17, *([IMAGE_TOKEN] * 4), 30, 41, 52, *([IMAGE_TOKEN] * 4), 9]])
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return ids, pixels


def test_logits_match_transformers(checkpoint) -> None:
    path, reference = checkpoint
    ids, pixels = _inputs()
    ours = load_llava(path)
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixels)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
    # The image changes the answer: the features really are spliced in.
    with torch.no_grad():
        assert not torch.allclose(ours(ids, pixels.flip(0)), got, atol=1e-3)


def test_greedy_tokens_match_transformers(checkpoint) -> None:
    path, reference = checkpoint
    ids, pixels = _inputs()
    ours = load_llava(path)
    with torch.no_grad():
        expected = reference.generate(
            input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False,
            attention_mask=torch.ones_like(ids),
        )[0, ids.shape[1]:].tolist()  # fmt: skip
    assert ours.greedy(ids[0].tolist(), pixels, 8) == expected


def test_preprocessing_matches_clip_image_processor() -> None:
    image = Image.effect_noise((50, 37), 80).convert("RGB")
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
    )
    expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
    got = preprocess(image, SIZE)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 0.05  # resampling rounding differs by a pixel level
