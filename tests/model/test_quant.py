"""Low-bit weights: GGUF blocks decoded exactly, the low-bit layers' two paths, the loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sorai.errors import ModelFormatError
from sorai.model.gguf import GGUFFile
from sorai.model.loader import load_model
from sorai.model.quant import Int4Linear, Int8Linear
from sorai.model.quant.gguf_blocks import int4_groups, q8_0_rows
from sorai.model.quant.table import Int8Embedding, Int8Head
from sorai.model.weights import save_hf_dir

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "日本の首都は？"]


def _expand(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    rows = q.shape[0]
    return (q.float().view(rows, -1, 32) * scale[..., None] + minimum[..., None]).view(rows, -1)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_4_bit_blocks_decode_exactly(qtype: str) -> None:
    import gguf

    kind = getattr(gguf.GGMLQuantizationType, qtype)
    weights = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    raw = gguf.quants.quantize(weights, kind)
    reference = gguf.quants.dequantize(raw, kind)
    assert np.array_equal(_expand(*int4_groups(raw.reshape(-1), qtype, 8)).numpy(), reference)


def test_q4_k_blocks_decode_exactly() -> None:
    import gguf

    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(3, 144), dtype=np.uint8)
    raw[:, :4] = np.frombuffer(np.array([0.01, 0.003] * 3, np.float16).tobytes(), np.uint8).reshape(
        3, 4
    )  # d and dmin: finite values
    reference = gguf.quants.dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType.Q4_K)
    ours = _expand(*int4_groups(raw.reshape(-1), "Q4_K", 1))
    assert np.array_equal(ours.numpy(), reference.reshape(1, -1))


def test_q8_0_rows_are_within_half_a_step(default_gguf: Path) -> None:
    gguf_file = GGUFFile(default_gguf)
    info = next(i for i in gguf_file.tensor_infos if i.name == "token_embd.weight")
    q, scale = q8_0_rows(gguf_file.raw(info), info.shape[0])
    reference = gguf_file.dequantized("embed_tokens.weight", info, gguf_file.config())
    error = (q.float() * scale[:, None] - reference).abs()
    assert torch.all(error <= scale[:, None] / 2 + 1e-6)


@pytest.mark.parametrize("kind", [Int4Linear, Int8Linear])
def test_the_kernel_and_the_dense_path_compute_the_same_products(kind) -> None:
    torch.manual_seed(0)
    weight = torch.randn(192, 576) / 24
    layer = kind.quantize(weight, bias=torch.randn(192))
    x = torch.randn(64, 576)
    one_by_one = torch.cat([layer(row[None]) for row in x[:4]])  # the low-bit kernel
    together = layer(x)[:4]  # 64 rows: the dense GEMM on the kernel's own weight
    torch.testing.assert_close(together, one_by_one, rtol=1e-2, atol=1e-2)
    # ... and both stand for the quantized weight they hold.
    exact = torch.nn.functional.linear(x[:4], layer.dequantize(), layer.bias)
    torch.testing.assert_close(together, exact, rtol=3e-2, atol=3e-2)
    error = (layer.dequantize() - weight).abs().max().item()
    assert error < (0.02 if kind is Int4Linear else 0.002)


def test_the_default_gguf_keeps_its_int4_blocks_and_answers_like_the_dense_model(
    default_gguf: Path,
) -> None:
    lowbit, tokenizer = load_model(default_gguf)
    dense, _ = load_model(default_gguf, quantize="none")
    layers = [m for m in lowbit.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 7 * len(lowbit.layers)  # every block projection, from Q4_1
    # The Q8_0 token table: int8, one tensor for the embedding and the tied head.
    assert isinstance(lowbit.embed_tokens, Int8Embedding)
    assert isinstance(lowbit.lm_head, Int8Head)
    assert lowbit.lm_head.q.data_ptr() == lowbit.embed_tokens.q.data_ptr()
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode_chat([{"role": "user", "content": prompt}])])
        with torch.inference_mode():
            ours, reference = lowbit(ids)[0, -1], dense(ids)[0, -1]
        # Only the activations' bfloat16 rounding separates them (the weights are the same).
        assert (ours - reference).abs().max() < 1.5
        assert reference[ours.argmax()] >= reference.max() - 0.2


def test_int8_and_int4_at_load(default_gguf: Path, tmp_path: Path) -> None:
    int8, tokenizer = load_model(default_gguf, quantize="int8")
    assert all(isinstance(m, Int8Linear) for m in int8.layers["0"].mlp.children())
    dense, _ = load_model(default_gguf, quantize="none")
    save_hf_dir(dense, tmp_path)
    tokenizer.save(tmp_path)
    int4, _ = load_model(tmp_path, quantize="int4")  # a dense checkpoint, quantized at load
    assert isinstance(int4.layers["5"].self_attn.k_proj, Int4Linear)
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.inference_mode():
        for model in (int8, int4):
            assert tokenizer.decode([int(model(ids)[0, -1].argmax())]).strip() == "Paris"


def test_an_unknown_quantize_value_names_the_choices(default_gguf: Path) -> None:
    with pytest.raises(ModelFormatError, match="quantize 'int3' is not supported.*int8, int4"):
        load_model(default_gguf, quantize="int3")
