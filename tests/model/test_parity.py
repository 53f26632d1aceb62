"""The model family is supported when it matches transformers: logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sorai.model.gguf import GGUFFile
from sorai.model.transformer import Transformer
from sorai.model.weights import load_gguf, load_hf_dir, save_hf_dir

from .reference import load_reference, reference_greedy, sorai_greedy, write_hf_checkpoint

FAMILIES = {
    "llama-gqa-untied": ("llama", {"tie_word_embeddings": False}),
    "llama-attention-bias": ("llama", {"attention_bias": True, "tie_word_embeddings": True}),
    "qwen2-qkv-bias": ("qwen2", {"tie_word_embeddings": False}),
    "mistral": ("mistral", {"sliding_window": None}),
    "llama3-rope-scaling": (
        "llama",
        {
            "rope_theta": 500000.0,
            # original length far below the test's positions, so the scaling really matters
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama-head-dim": ("llama", {"head_dim": 32}),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory) -> Path:
    model_type, overrides = FAMILIES[request.param]
    return write_hf_checkpoint(tmp_path_factory.mktemp(request.param), model_type, **overrides)


def prompt(n: int = 64, vocab: int = 512, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_hf_checkpoint_logits_match_transformers(checkpoint: Path) -> None:
    ours = load_hf_dir(checkpoint, torch.float32)
    reference = load_reference(checkpoint)
    ids = prompt()[None]
    with torch.inference_mode():
        expected = reference(ids).logits
        actual = ours(ids)
    assert (actual - expected).abs().max().item() < 1e-4


def test_hf_checkpoint_greedy_tokens_match_transformers(checkpoint: Path) -> None:
    ours = load_hf_dir(checkpoint, torch.float32)
    reference = load_reference(checkpoint)
    assert sorai_greedy(ours, prompt(), 32) == reference_greedy(reference, prompt(), 32)


def test_chunked_prefill_equals_one_shot_prefill(checkpoint: Path) -> None:
    model = load_hf_dir(checkpoint, torch.float32)
    assert sorai_greedy(model, prompt(), 8, chunk=7) == sorai_greedy(model, prompt(), 8)


def test_bfloat16_logits_stay_close_to_float32(checkpoint: Path) -> None:
    ids = prompt()[None]
    with torch.inference_mode():
        full = load_hf_dir(checkpoint, torch.float32)(ids)[0, -1]
        half = load_hf_dir(checkpoint, torch.bfloat16)(ids)[0, -1].float()
    assert torch.nn.functional.cosine_similarity(full, half, dim=0) > 0.99


def test_saved_directory_loads_back_identically_in_sorai_and_transformers(
    checkpoint: Path, tmp_path: Path
) -> None:
    model = load_hf_dir(checkpoint, torch.float32)
    save_hf_dir(model, tmp_path)
    ids = prompt()[None]
    with torch.inference_mode():
        expected = model(ids)
        assert torch.equal(load_hf_dir(tmp_path, torch.float32)(ids), expected)
        assert (load_reference(tmp_path)(ids).logits - expected).abs().max() < 1e-5


def test_sharded_save_writes_an_index_and_loads_back(tmp_path: Path) -> None:
    source = write_hf_checkpoint(tmp_path / "src", "llama")
    model = load_hf_dir(source, torch.float32)
    save_hf_dir(model, tmp_path / "sharded", shard_bytes=1 << 20)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = prompt()[None]
    with torch.inference_mode():
        expected = model(ids)
        assert torch.equal(load_hf_dir(tmp_path / "sharded", torch.float32)(ids), expected)
        assert (load_reference(tmp_path / "sharded")(ids).logits - expected).abs().max() < 1e-5


# The default model against transformers is the slow tier's (transformers' GGUF load alone is
# ~30 s); the tiny checkpoints above check logits, greedy tokens and saving in the fast tier,
# and tests/model/test_gguf.py the GGUF reader against them.
@pytest.fixture(scope="module")
def default_pair(default_gguf: Path) -> tuple[Transformer, torch.nn.Module]:
    ours = load_gguf(GGUFFile(default_gguf), torch.float32)
    reference = load_reference(default_gguf.parent, gguf_file=default_gguf.name)
    return ours, reference


@pytest.mark.slow
def test_default_model_last_logits_match_transformers(default_pair) -> None:
    ours, reference = default_pair
    ids = prompt(64, vocab=49152)[None]
    with torch.inference_mode():
        diff = (ours(ids)[0, -1] - reference(ids).logits[0, -1]).abs().max().item()
    assert diff < 1e-4


@pytest.mark.slow
def test_default_model_greedy_tokens_match_transformers(default_pair) -> None:
    ours, reference = default_pair
    ids = prompt(64, vocab=49152)
    assert sorai_greedy(ours, ids, 32) == reference_greedy(reference, ids, 32)


@pytest.mark.slow
def test_default_model_saved_as_hf_directory_matches_transformers(default_pair, tmp_path) -> None:
    ours, _ = default_pair
    save_hf_dir(ours, tmp_path)
    ids = prompt(64, vocab=49152)[None]
    with torch.inference_mode():
        diff = (load_reference(tmp_path)(ids).logits - ours(ids)).abs().max().item()
    assert diff < 1e-4


@pytest.mark.slow
def test_inference_layout_from_load_model_keeps_the_logits(default_pair, default_gguf) -> None:
    from sorai.model.loader import load_model

    ours, reference = default_pair
    relaid, _ = load_model(default_gguf, "float32", "cpu", quantize="none")
    assert not relaid.layers["0"].mlp.up_proj.weight.is_contiguous()  # the layout did change
    assert not relaid.lm_head.weight.is_contiguous()  # the tied head too, still shared
    assert relaid.lm_head.weight is relaid.embed_tokens.weight
    ids = prompt(64, vocab=49152)[None]
    with torch.inference_mode():
        diff = (relaid(ids)[0, -1] - reference(ids).logits[0, -1]).abs().max().item()
    assert diff < 1e-4
    assert sorai_greedy(relaid, ids[0], 32) == reference_greedy(reference, ids[0], 32)
