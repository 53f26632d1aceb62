"""Images in a prompt, for a model with an image encoder (a LLaVA's, sorai/model/llava.py):
where each image's tokens sit, what the prefix cache hashes in their place, their rows.

A prompt holds `tokens_per_image` image tokens per image, in the images' order. The encoder
runs once per image, the first time a prefill chunk reaches its span (a span already in the
prefix cache never runs it). The prefix cache hashes each image token as a value made from the
image's sha256, so a block covering an image is shared only by requests with the same image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sorai.errors import SoraiError


@dataclass(frozen=True, eq=False)
class PromptImage:
    """One image of a prompt, preprocessed for the model's encoder."""

    pixels: Tensor  # [3, S, S]
    digest: bytes  # sha256 of the pixels: what the prefix cache keys the image by

    @classmethod
    def from_pixels(cls, pixels: Tensor) -> PromptImage:
        data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return cls(pixels, hashlib.sha256(data).digest())


@dataclass(eq=False)
class ImageSpan:
    """Prompt positions [start, end) hold `image`'s rows, computed on first use."""

    start: int
    end: int
    image: PromptImage
    rows: Tensor | None = field(default=None, repr=False)

    def rows_for(self, encoder: Callable[[Tensor], Tensor]) -> Tensor:
        if self.rows is None:
            self.rows = encoder(self.image.pixels)
        return self.rows


def expand_image_tokens(prompt_ids: Sequence[int], image_token: int, per_image: int) -> list[int]:
    """Each single image token of a rendered prompt -> `per_image` of them (one per patch)."""
    out: list[int] = []
    for token in prompt_ids:
        out.extend([token] * per_image if token == image_token else [token])
    return out


def image_spans(
    prompt_ids: Sequence[int],
    images: Sequence[PromptImage],
    image_token: int,
    per_image: int,
) -> list[ImageSpan]:
    """The images' spans in `prompt_ids`; SoraiError when the image tokens and the images
    do not match (each image takes `per_image` consecutive image tokens)."""
    positions = [i for i, token in enumerate(prompt_ids) if token == image_token]
    if len(positions) != len(images) * per_image:
        raise SoraiError(
            f"the prompt holds {len(positions)} image tokens (id {image_token}) for "
            f"{len(images)} image(s); each image takes {per_image} of them"
        )
    spans = []
    for k, image in enumerate(images):
        run = positions[k * per_image : (k + 1) * per_image]
        if run[-1] - run[0] != per_image - 1:
            raise SoraiError(
                f"image {k + 1}'s {per_image} image tokens are not consecutive in the prompt"
            )
        spans.append(ImageSpan(run[0], run[-1] + 1, image))
    return spans


def hash_ids(prompt_ids: Sequence[int], spans: Sequence[ImageSpan]) -> list[int]:
    """`prompt_ids` with each image token replaced by a negative value made from its image's
    sha256 (no real token is negative): what the prefix cache hashes."""
    out = list(prompt_ids)
    for span in spans:
        key = -1 - int.from_bytes(span.image.digest[:8], "little") % 2**62
        out[span.start : span.end] = [key] * (span.end - span.start)
    return out


def splice_rows(
    embeds: Tensor,
    pieces: Sequence[tuple[int, int, int, Sequence[ImageSpan]]],
    encoder: Callable[[Tensor], Tensor],
) -> None:
    """Write image rows into `embeds` [T, hidden] in place. Each piece is (row of its first
    token in `embeds`, its first prompt position, its token count, its request's spans)."""
    for row, start, n, spans in pieces:
        for span in spans:
            lo, hi = max(span.start, start), min(span.end, start + n)
            if lo < hi:
                rows = span.rows_for(encoder)
                embeds[row + lo - start : row + hi - start] = rows[
                    lo - span.start : hi - span.start
                ].to(embeds.dtype)
