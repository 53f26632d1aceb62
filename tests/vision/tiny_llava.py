"""A tiny random LLaVA-1.5-layout checkpoint for the serving tests, written with sorai's own
modules (no transformers import: the parity with transformers is tests/model/test_llava.py's).

It borrows the default model's tokenizer (so the chat template and the detokenizer are real)
and one of its unused special tokens as the image token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from sorai.model.llava import Llava
from sorai.model.tokenizer import Tokenizer

IMAGE_TEXT = "<filename>"  # SmolLM2's tokenizer has it as one special token (id 6)
IMAGE_SIZE, PATCH = 56, 14  # 16 patches: 16 image tokens per image


def config(image_token: int, vocab_size: int) -> dict:
    text = {
        "model_type": "llama", "vocab_size": vocab_size, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False,
    }  # fmt: skip
    vision = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": PATCH,
    }  # fmt: skip
    return {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": image_token, "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
        "text_config": text, "vision_config": vision,
    }  # fmt: skip


def write(path: Path, tokenizer: Tokenizer, seed: int = 0) -> Path:
    """The checkpoint (config.json, model.safetensors, the tokenizer's files) under `path`."""
    image_token = tokenizer.token_to_id(IMAGE_TEXT)
    assert image_token is not None
    raw = config(image_token, tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = Llava(raw)
    with torch.no_grad():  # default init leaves norms at one and biases at zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("language_model.lm_head."):
            key = key.removeprefix("language_model.")
        elif key.startswith("language_model."):
            key = "model." + key  # transformers' current layout
        state[key] = value.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    tokenizer.save(path)
    return path


def picture(seed: int) -> Image.Image:
    """A noise image (a different one per seed)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (IMAGE_SIZE + 9, IMAGE_SIZE, 3), generator=generator)
    return Image.fromarray(pixels.to(torch.uint8).numpy())
