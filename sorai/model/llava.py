"""A LLaVA-1.5-layout vision-language model in plain PyTorch: a CLIP vision tower, a two-layer
projector, and the Llama-family decoder of sorai/model/transformer.py.

The image is preprocessed as CLIPImageProcessor does (shortest side resized, centre crop,
scaled to [0, 1], normalised); the tower's features from `vision_feature_layer` (default -2),
without the class token, are projected to the decoder's width and take the places of the
prompt's image tokens (`image_token_index`: one per patch). Read from a Hugging Face
LlavaForConditionalGeneration directory (config.json + safetensors, either key layout).

To serve one, load_llava_decoder returns the decoder (a plain Transformer, as every other
checkpoint) with an ImageEncoder attached as `image_encoder`: the engine runs it on each
image and puts its rows at the image tokens' places (sorai/engine/images.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor, nn

from sorai.errors import ModelFormatError
from sorai.model.config import ModelConfig
from sorai.model.transformer import Transformer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> VisionConfig:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in raw.items() if k in names})

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ModelFormatError(f"activation {name!r} is not supported; supported: quick_gelu, gelu")


class _VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class _VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = _activation(c.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _VisionLayer(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = _VisionAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = _VisionMLP(c)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVision(nn.Module):
    """CLIP's vision transformer; forward returns every layer's hidden states (the input to
    the first layer included, as Hugging Face counts them)."""

    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.config = c
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.position_embedding = nn.Embedding(c.patches + 1, c.hidden_size)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(_VisionLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, pixels: Tensor) -> list[Tensor]:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + self.position_embedding.weight
        x = self.pre_layrnorm(x)
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        return states


class Projector(nn.Module):
    def __init__(self, vision: int, text: int, act: str) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision, text)
        self.linear_2 = nn.Linear(text, text)
        self.act = _activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class Llava(nn.Module):
    def __init__(self, raw: dict[str, Any]) -> None:
        super().__init__()
        self.vision_config = VisionConfig.from_hf_dict(raw["vision_config"])
        self.text_config = ModelConfig.from_hf_dict(raw["text_config"])
        self.image_token_index = int(raw.get("image_token_index", raw.get("image_token_id", 0)))
        self.feature_layer = int(raw.get("vision_feature_layer", -2))
        if raw.get("vision_feature_select_strategy", "default") != "default":
            raise ModelFormatError("only vision_feature_select_strategy 'default' is supported")
        self.vision_tower = CLIPVision(self.vision_config)
        self.multi_modal_projector = Projector(
            self.vision_config.hidden_size,
            self.text_config.hidden_size,
            raw.get("projector_hidden_act", "gelu"),
        )
        self.language_model = Transformer(self.text_config)

    def image_features(self, pixels: Tensor) -> Tensor:
        """[N, 3, S, S] preprocessed images -> [N, patches, text hidden]."""
        states = self.vision_tower(pixels)[self.feature_layer][:, 1:]
        return self.multi_modal_projector(states)

    def forward(self, ids: Tensor, pixels: Tensor | None = None) -> Tensor:
        """Logits [B, T, vocab] for `ids` [B, T], whose image tokens take the features of
        `pixels` (one image per run of `patches` image tokens, in order)."""
        decoder = self.language_model
        assert decoder.embed_tokens is not None
        is_image = ids == self.image_token_index
        x = decoder.embed_tokens(ids.masked_fill(is_image, 0))
        if pixels is not None:
            features = self.image_features(pixels).to(x.dtype).reshape(-1, x.shape[-1])
            if int(is_image.sum()) != features.shape[0]:
                raise ModelFormatError(
                    f"the prompt has {int(is_image.sum())} image tokens; {pixels.shape[0]} "
                    f"image(s) need {features.shape[0]}"
                )
            x = x.masked_scatter(is_image[..., None], features)
        embed, decoder.embed_tokens = decoder.embed_tokens, None
        try:
            return decoder(x)  # without its embedding, the decoder takes hidden states
        finally:
            decoder.embed_tokens = embed

    @torch.no_grad()
    def greedy(self, ids: list[int], pixels: Tensor | None, new_tokens: int) -> list[int]:
        """`new_tokens` greedy tokens after `ids` (the whole prefix each step: a reference
        path for tests, not the serving one)."""
        out = list(ids)
        for _ in range(new_tokens):
            logits = self(torch.tensor([out]), pixels)
            out.append(int(logits[0, -1].argmax()))
        return out[len(ids) :]


class ImageEncoder:
    """A LLaVA's vision tower and projector, apart from its decoder: an image in, one row of
    decoder input per image token out. A plain object, not a module, so that attaching it to
    the decoder adds nothing to the decoder's parameters."""

    def __init__(self, llava: Llava) -> None:
        self.tower = llava.vision_tower
        self.projector = llava.multi_modal_projector
        self.feature_layer = llava.feature_layer
        self.image_token_index = llava.image_token_index
        self.image_size = llava.vision_config.image_size
        self.tokens_per_image = llava.vision_config.patches

    def preprocess(self, image: Image.Image) -> Tensor:
        """[3, S, S] pixels, as the checkpoint's CLIPImageProcessor makes them."""
        return preprocess(image, self.image_size)

    @torch.no_grad()
    def __call__(self, pixels: Tensor) -> Tensor:
        """[3, S, S] (or [N, 3, S, S]) pixels -> [N * tokens_per_image, text hidden] rows."""
        device = self.projector.linear_1.weight.device
        pixels = pixels.to(device)
        if pixels.dim() == 3:
            pixels = pixels[None]
        states = self.tower(pixels)[self.feature_layer][:, 1:]
        return self.projector(states).flatten(0, 1)

    def to(self, device: torch.device | str) -> ImageEncoder:
        self.tower.to(device)
        self.projector.to(device)
        return self


def load_llava_decoder(path: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """The checkpoint's decoder, for the engine, with its ImageEncoder as `image_encoder`."""
    llava = load_llava(path, dtype)
    decoder = llava.language_model
    decoder.image_encoder = ImageEncoder(llava)  # a plain attribute: see ImageEncoder
    return decoder


def preprocess(image: Image.Image, size: int) -> Tensor:
    """CLIPImageProcessor's defaults: shortest side to `size` (bicubic), centre crop to
    size x size, [0, 1], normalised with CLIP's mean and std; [3, size, size]."""
    image = image.convert("RGB")
    scale = size / min(image.size)
    # The long side rounds down, as transformers' get_resize_output_image_size does.
    width, height = max(size, int(image.width * scale)), max(size, int(image.height * scale))
    image = image.resize((width, height), Image.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    return ((pixels / 255 - mean) / std).permute(2, 0, 1)


_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("lm_head.", "language_model.lm_head."),
)


def _renamed(key: str) -> str | None:
    for old, new in _PREFIXES:
        if key.startswith(old):
            key = new + key[len(old) :]
            # CLIP keeps its layers under encoder.layers, its embeddings under embeddings.
            key = key.replace("vision_tower.encoder.layers.", "vision_tower.layers.")
            return key.replace("vision_tower.embeddings.", "vision_tower.")
    return None


def load_llava(path: str | Path, dtype: torch.dtype = torch.float32) -> Llava:
    """A LlavaForConditionalGeneration directory (config.json, *.safetensors)."""
    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path}: no readable config.json ({exc})") from None
    if raw.get("model_type") != "llava":
        raise ModelFormatError(f"{path}: model_type {raw.get('model_type')!r}, expected 'llava'")
    model = Llava(raw)
    state: dict[str, Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        for key, value in load_file(file).items():
            name = _renamed(key)
            # post_layernorm: CLIP's pooled output, which LLaVA does not use.
            if name is not None and "post_layernorm" not in name and "position_ids" not in name:
                state[name] = value
    if "language_model.lm_head.weight" not in state and model.text_config.tie_word_embeddings:
        state["language_model.lm_head.weight"] = state["language_model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelFormatError(
            f"{path}: weights do not match the LLaVA layout (missing {missing[:4]}, "
            f"unexpected {unexpected[:4]})"
        )
    model.language_model.tie_weights()
    return model.to(dtype).eval()
