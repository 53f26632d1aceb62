"""sorai: an open, self-hosted generative-AI platform."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# OpenMP's wait policy is read once, as torch loads, so it is chosen here, before sorai imports
# torch: PASSIVE (idle threads sleep) for serving and the Python engine; `sorai train` switches
# its training process to ACTIVE (sorai/openmp.py). A value the user set is kept.
from sorai import openmp as _openmp  # noqa: E402

_openmp.choose(_openmp.SERVE)

if TYPE_CHECKING:
    import torch

    from sorai.engine.config import EngineConfig
    from sorai.engine.llm import LLM


def __getattr__(name: str):
    # The public types, imported on first use so `import sorai` does not pull in torch.
    if name == "SamplingParams":
        from sorai.engine.params import SamplingParams

        return SamplingParams
    if name == "LLM":
        from sorai.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'sorai' has no attribute {name!r}")


def load(
    model: str | os.PathLike = "smollm2-135m-instruct",
    dtype: str | torch.dtype | None = None,
    progress: Callable[[str], None] | None = None,
    device: str | torch.device | None = None,
    adapter: str | os.PathLike | None = None,
    config: EngineConfig | None = None,
    quantize: str = "auto",
    adapters: Mapping[str, str | os.PathLike] | None = None,
) -> LLM:
    """Load a known model name (pulled on first use), an HF directory or a .gguf file.

    device defaults to the GPU when there is one, else the CPU. dtype "auto" (or None) picks by
    machine: bfloat16 on a GPU and on a CPU with bf16 dot products (AVX-512 BF16, AMX), float32
    on other CPUs, where bfloat16 runs slower (sorai.model.hardware.auto_dtype).

    adapter: a LoRA adapter directory in PEFT format (adapter_config.json +
    adapter_model.safetensors) for this base model, e.g. what `sorai train` wrote. It is merged
    into the weights (in float32, then stored in `dtype`), so the model runs at full speed. The
    LLM's name becomes `<model>+<adapter name>`, the adapter name being its directory's name
    (for `<output_dir>/adapter`, as `sorai train` writes it, output_dir's name). A bad adapter
    raises LoRAError (a SoraiError) naming the path.

    adapters: {name: PEFT adapter directory}, served unmerged over the shared base weights: a
    request runs one with `adapter=name` (`llm.chat(..., adapter="faq")`), others run the base,
    and requests of different adapters share one batch (see docs/python-api.md, Adapters).

    quantize: "auto" keeps a GGUF's low-bit weights low-bit (int4/int8 layers on PyTorch's own
    low-bit matmuls; a dense checkpoint stays dense), "none" dequantizes everything to `dtype`,
    "int8"/"int4" quantize at load. See docs/models.md (Quantization).

    config: the engine's settings (KV cache, batch budgets, threads); by default a KV cache for
    one whole context window (at most 1 GiB). The LLM runs on the same engine as `sorai serve`.

    >>> llm = sorai.load()
    >>> llm.chat([{"role": "user", "content": "Hi!"}], max_tokens=20).text
    """
    # Imported here so `import sorai` (and `sorai --version`) stays fast.
    from sorai.engine.llm import LLM

    return LLM.from_model(
        model,
        dtype,
        device,
        adapter=adapter,
        config=config,
        progress=progress,
        quantize=quantize,
        adapters=adapters,
    )


def connect(
    url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    embedding_model: str | None = None,
):
    """A `sorai.apps.client.Client` for the apps (skills, RAG, agents, eval), on the endpoint
    the `sorai` verbs would use, the first that applies:

    1. `url` (e.g. http://127.0.0.1:8000/v1, or any OpenAI-compatible endpoint);
    2. $SORAI_URL, else $OPENAI_BASE_URL (the variable the openai client itself reads);
    3. a `sorai serve` answering on http://127.0.0.1:8000/v1 (its default port) that serves
       `model` when one is named;
    4. sorai's own server started in this process on a loopback port with `model` (default:
       the embedded default model), stopped by `client.close()`.

    `model` defaults to the first chat model the endpoint lists. `api_key` defaults to
    $SORAI_API_KEY, else $OPENAI_API_KEY (for 3., $SORAI_API_KEY only). A server on the default
    port that refuses the key raises ClientError. `Client.connect(url)` and `Client.local()`
    (sorai.apps.client) pick one endpoint outright.

    >>> with sorai.connect() as client:
    ...     client.chat([{"role": "user", "content": "Hi!"}], max_tokens=20)
    """
    from sorai.apps.client import Client

    return Client.find(url, api_key, model, embedding_model)
