"""Test helpers: small random-init checkpoints written with transformers, and greedy loops."""

from __future__ import annotations

from pathlib import Path

import torch

from sorai.model.kv_cache import ContiguousKVCache
from sorai.model.transformer import Transformer

TINY = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def write_hf_checkpoint(path: Path, model_type: str, **overrides) -> Path:
    """A random-init transformers model of `model_type`, saved as safetensors under `path`."""
    import transformers

    config_cls = transformers.AutoConfig.for_model(model_type, **{**TINY, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls, dtype=torch.float32)
    # Random init leaves biases at zero; make them matter so a dropped bias fails the test.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.5)
    model.save_pretrained(path)
    return path


def load_reference(path: Path, dtype: torch.dtype = torch.float32, gguf_file: str | None = None):
    import transformers

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model.eval()


def peft_reference(checkpoint: Path, config, seed: int = 3, std: float = 0.05):
    """transformers + peft over `checkpoint` with the LoraConfig `config`, every lora_B drawn
    at random (peft starts B at zero, which would make the adapter change nothing)."""
    from peft import get_peft_model

    reference = get_peft_model(load_reference(checkpoint), config)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, param in reference.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return reference


def reference_greedy(reference, prompt: torch.Tensor, n: int) -> list[int]:
    with torch.inference_mode():
        out = reference.generate(
            prompt[None],
            attention_mask=torch.ones_like(prompt[None]),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def sorai_greedy(model: Transformer, prompt: torch.Tensor, n: int, chunk: int = 0) -> list[int]:
    """Greedy decoding over a ContiguousKVCache; `chunk` > 0 prefills in chunks of that size."""
    cache = ContiguousKVCache.for_model(model, len(prompt) + n)
    chunk = chunk or len(prompt)
    out = []
    with torch.inference_mode():
        for start in range(0, len(prompt), chunk):
            part = prompt[start : start + chunk]
            logits = model(part[None], torch.arange(start, start + len(part)), cache)[0, -1]
        for i in range(n):
            token = int(logits.argmax())
            out.append(token)
            position = torch.tensor([len(prompt) + i])
            logits = model(torch.tensor([[token]]), position, cache)[0, -1]
    return out
