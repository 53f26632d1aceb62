"""The one transformer: the Llama family (Llama 2/3, SmolLM, Qwen2, Mistral) in plain PyTorch.

Parallelism is applied from outside: blocks live in a ModuleDict keyed "0".."N-1", and the
embedding, final norm and head may be None, so a pipeline stage is this model with parts deleted.
Module names follow Hugging Face (`layers.0.self_attn.q_proj`), so checkpoints and adapters map
one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sorai.errors import ModelFormatError
from sorai.model import rms_norm
from sorai.model.config import ModelConfig
from sorai.model.fusion import fused
from sorai.model.kv_cache import KVCache, causal_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # Inference on the CPU: a C kernel (sorai/model/rms_norm.py), where one is built.
            out = rms_norm.normalize(x, self.weight, self.eps)
            if out is not None:
                return out
            # One op with the scale folded in: the same numbers as the two below in float32,
            # and 120 fewer ops per decode step of a 30-block model.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in float32 whatever the weights' dtype, then scale in the weights' dtype,
        # as the reference does; the fused op keeps decoding's per-token op count down.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Inverse frequencies of the rotary embedding, with the config's scaling applied.

    Always computed on the CPU, even while a model is built on the meta device: it is not in
    checkpoints, so it must hold real values, and meta-device math imports torch's compiler.
    """
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are stretched by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    raise ModelFormatError(
        f"rope scaling type {kind!r} is not supported; supported: default, linear, llama3"
    )


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half's negation folded into signed_sin.

    Rolling by half the head swaps the halves in one op (rotate_half takes four), which
    matters when decoding runs it twice per layer per token.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        dim, q_dim = config.hidden_size, self.n_heads * self.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(dim, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(dim, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, dim, bias=config.o_proj_bias)

    @property
    def num_local_kv_heads(self) -> int:
        """Key/value heads this layer computes, from its projection's width: a tensor-parallel
        shard holds fewer than the config says, and a low-bit layer has no float weight."""
        proj = self.k_proj
        width = proj.weight.shape[0] if isinstance(proj, nn.Linear) else proj.out_features
        return width // self.head_dim

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: KVCache | None,
        mask: Tensor | None = None,
    ) -> Tensor:
        batch, seq, _ = x.shape
        # Head counts come from the weights, not the config, so a tensor-parallel shard
        # (fewer heads per rank) runs through the same code.
        qkv = fused(self, (self.q_proj, self.k_proj, self.v_proj))
        if qkv is not None:
            # One matmul, and one rotary pass over the query and key heads side by side.
            q_dim = qkv.sizes[0]
            out = qkv.module(x)
            qk = out[..., : q_dim + qkv.sizes[1]].view(batch, seq, -1, self.head_dim)
            qk = apply_rope(qk.transpose(1, 2), *rope)
            q, k = qk.split((q_dim // self.head_dim, qkv.sizes[1] // self.head_dim), dim=1)
            v = out[..., q_dim + qkv.sizes[1] :].view(batch, seq, -1, self.head_dim)
            v = v.transpose(1, 2)
        else:
            q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            out = causal_attention(q, k, v, mask)
        else:
            out = cache.attend(self.layer, q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim, hidden, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate_up = fused(self, (self.gate_proj, self.up_proj))
        if gate_up is not None:
            gate, up = gate_up(x)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: KVCache | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Token ids (or a previous stage's hidden states) in; logits (or hidden states) out."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Built from an empty weight: models are made on the meta device and then loaded, and
        # nn.Embedding's own random init there imports half of torch's compiler stack (~2 s).
        # init_weights() gives a fresh model its values.
        self.embed_tokens: nn.Embedding | None = nn.Embedding(
            config.vocab_size,
            config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size),
        )
        self.layers = nn.ModuleDict(
            {str(i): Block(config, i) for i in range(config.num_hidden_layers)}
        )
        self.norm: RMSNorm | None = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(
            config.hidden_size, config.vocab_size, bias=False
        )
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        # Only float layers tie by sharing a Parameter; low-bit ones share their table when
        # they are built (see sorai.model.quant.load).
        plain = isinstance(self.embed_tokens, nn.Embedding) and isinstance(self.lm_head, nn.Linear)
        if self.config.tie_word_embeddings and plain:
            self.lm_head.weight = self.embed_tokens.weight

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and signed sin (see apply_rope) for `positions`: [T] gives [T, head_dim], shared
        by the batch; [B, T] (per-row positions, e.g. packed documents) gives [B, 1, T, head_dim]
        to broadcast over the heads."""
        freqs = positions.float()[..., None] * self.inv_freq.float()
        cos, sin = freqs.cos(), freqs.sin()
        cos, sin = torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]
        return cos, sin

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        logit_indices: Tensor | None = None,
        mask: Tensor | None = None,
        head: bool = True,
    ) -> Tensor:
        """tokens: [B, T] ids (or [B, T, hidden] states when there is no embedding).

        positions: [T] absolute positions (default 0..T-1), or [B, T] per row. last_only:
        project only the last position to logits, which is all that generation needs after a
        prefill. logit_indices: project only these positions (of T), as the engine does for a
        batch of sequences flattened into one row. mask: bool [B, 1, T, T], True where a query
        may see a key (without a cache; default causal), e.g. documents packed in one row.
        head=False returns the final norm's output instead of logits, for callers that apply
        the head themselves (a loss computed in chunks never holds all logits at once).
        """
        x = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        if positions is None:
            # From the input, not x: under sequence parallelism x holds a slice of the sequence.
            positions = torch.arange(tokens.shape[1], device=x.device)
        rope = self.rope(positions, x.dtype)
        if cache is not None:
            cache.begin(positions)
        for block in self.layers.values():
            x = block(x, rope, cache, mask)
        if self.norm is not None:
            if last_only:
                x = x[:, -1:]
            elif logit_indices is not None:
                x = x[:, logit_indices]
            x = self.norm(x)
        if self.lm_head is not None and head:
            x = self.lm_head(x)
        return x

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def init_weights(self, std: float = 0.02) -> None:
        """Random initialisation for training from scratch and for tests."""
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.normal_(param, std=std)
