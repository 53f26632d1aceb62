"""Inference fusion of q/k/v and gate/up: same logits, same names, undone by a later wrap."""

import copy

import torch

from sorai.model.fusion import fuse_projections, fused
from sorai.model.loader import load_model
from sorai.model.lora import LoRAConfig, apply_lora


def _logits(model, tokens):
    with torch.inference_mode():
        return model(tokens)


def test_fused_model_gives_the_same_logits_and_keeps_its_weights(default_gguf) -> None:
    # bfloat16: CPU float32 Linears are left unfused (see concat_linears).
    model, tokenizer = load_model(default_gguf, dtype="bfloat16", quantize="none")
    tokens = torch.tensor([tokenizer.encode("The capital of France is Paris, and the")])
    before = _logits(model, tokens)
    names = {n: p.shape for n, p in model.state_dict().items()}
    assert fuse_projections(model) == 2 * len(model.layers)
    attention = model.layers["0"].self_attn
    assert fused(attention, (attention.q_proj, attention.k_proj, attention.v_proj)) is not None
    after = _logits(model, tokens)
    # The same products summed in the same order; a GEMM may still block a wider matrix
    # differently, so allow bf16 rounding.
    torch.testing.assert_close(after, before, rtol=2e-2, atol=2e-2)
    assert torch.equal(after[0].argmax(-1), before[0].argmax(-1))
    # Nothing new to save, nothing lost: the projections are views of the fused weight.
    assert {n: p.shape for n, p in model.state_dict().items()} == names
    fused_weight = attention.__dict__["_fused"].module.weight
    assert attention.k_proj.weight.untyped_storage().data_ptr() == (
        fused_weight.untyped_storage().data_ptr()
    )


def test_a_projection_wrapped_after_fusion_is_used(default_gguf) -> None:
    model, tokenizer = load_model(default_gguf, dtype="bfloat16", quantize="none")
    tokens = torch.tensor([tokenizer.encode("Hello there")])
    fuse_projections(model)
    wrapped = copy.deepcopy(model)
    torch.manual_seed(0)
    apply_lora(wrapped, LoRAConfig(r=4, target_modules=["q_proj", "up_proj"]))
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter change the output
            torch.nn.init.normal_(param, std=0.5)
    attention = wrapped.layers["0"].self_attn
    assert fused(attention, (attention.q_proj, attention.k_proj, attention.v_proj)) is None
    assert not torch.allclose(_logits(wrapped, tokens), _logits(model, tokens), atol=1e-3)


def test_trainable_weights_are_not_fused(default_gguf) -> None:
    model, _ = load_model(default_gguf, dtype="bfloat16", quantize="none")
    model.requires_grad_(True)
    assert fuse_projections(model) == 0


def test_cpu_float32_is_left_unfused(default_gguf) -> None:
    model, _ = load_model(default_gguf, dtype="float32", quantize="none")
    assert fuse_projections(model) == 0


def test_low_bit_layers_fuse_into_one_with_the_same_outputs(default_gguf) -> None:
    model, tokenizer = load_model(default_gguf)  # int4 blocks, the GGUF's own
    tokens = torch.tensor([tokenizer.encode("Low-bit layers join too")])
    before = _logits(model, tokens)
    assert fuse_projections(model) == 2 * len(model.layers)
    torch.testing.assert_close(_logits(model, tokens), before, rtol=1e-3, atol=1e-3)
    mlp = model.layers["3"].mlp
    joined = fused(mlp, (mlp.gate_proj, mlp.up_proj)).module
    # The parts are views of the joined layer's buffers: no second copy of the weights.
    assert mlp.up_proj.packed.untyped_storage().data_ptr() == (
        joined.packed.untyped_storage().data_ptr()
    )
    # A second engine over the same model fuses nothing anew: the joined layer (and whatever
    # its decode path gave it) stays.
    assert fuse_projections(model) == 2 * len(model.layers)
    assert fused(mlp, (mlp.gate_proj, mlp.up_proj)).module is joined
