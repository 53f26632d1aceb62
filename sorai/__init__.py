"""sorai: an open, self-hosted generative-AI platform."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    import torch

    from sorai.generate import LLM


def __getattr__(name: str):
    # The public types, imported on first use so `import sorai` does not pull in torch.
    if name == "SamplingParams":
        from sorai.sampling import SamplingParams

        return SamplingParams
    if name == "LLM":
        from sorai.generate import LLM

        return LLM
    raise AttributeError(f"module 'sorai' has no attribute {name!r}")


def load(
    model: str | os.PathLike = "smollm2-135m-instruct",
    dtype: str | torch.dtype | None = None,
    progress: Callable[[str], None] | None = None,
    device: str | torch.device | None = None,
) -> LLM:
    """Load a known model name (pulled on first use), an HF directory or a .gguf file.

    device defaults to the GPU when there is one, else the CPU; dtype to bfloat16 on a GPU and
    float32 on the CPU.

    >>> llm = sorai.load()
    >>> llm.chat([{"role": "user", "content": "Hi!"}], max_tokens=20).text
    """
    # Imported here so `import sorai` (and `sorai --version`) stays fast.
    from sorai import hub
    from sorai.generate import LLM
    from sorai.model.loader import load_model

    path = hub.resolve(model, progress=progress)
    transformer, tokenizer = load_model(path, dtype, device)
    return LLM(transformer, tokenizer, name=os.fspath(model))
