"""Sentence embeddings (sorai/model/bert.py) against sentence-transformers itself.

The default embedding model (all-MiniLM-L6-v2, pulled from its wheel) must give the same
vectors as `SentenceTransformer.encode` (float32 to 1e-5; bfloat16, the fast dtype where the
CPU has it, to 0.999 cosine), whatever the batching; small random BERTs written by the tests
cover the other pooling modes, no Normalize, and truncation; broken directories must fail with
one clear line. The exact comparisons pin float32, so they hold on a machine that picks bf16.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sorai.errors import ModelFormatError
from sorai.model import hardware
from sorai.model.bert import (
    MAX_PADDING,
    SentenceEncoder,
    SentenceEncoderConfig,
    encoder_dtype,
    length_batches,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # sentence-transformers must not look online

ENGLISH = [
    "The cat sits on the mat.",
    "A man is playing a guitar on stage.",
    "The new movie is awesome!",
    "Stock markets fell sharply after the announcement.",
    "She walked her dog in the park before breakfast.",
    "Quantum computers use qubits instead of bits.",
    "How do I reset my password?",
    "The weather today is sunny and warm.",
    "Paris is the capital of France.",
    "I love eating fresh strawberries in summer.",
]
JAPANESE = ["今日はとても良い天気です。", "東京は日本の首都です。"]


def sentence_transformer(path: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


def reference(path: Path, texts: list[str]) -> torch.Tensor:
    return torch.from_numpy(sentence_transformer(path).encode(texts, convert_to_numpy=True))


@pytest.fixture(scope="module")
def minilm(default_encoder_dir: Path) -> SentenceEncoder:
    return SentenceEncoder.from_dir(default_encoder_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def minilm_reference(default_encoder_dir: Path):
    return sentence_transformer(default_encoder_dir)


# ---- the default model against sentence-transformers ---------------------------------------


def test_english_sentences_match_sentence_transformers(
    minilm: SentenceEncoder, minilm_reference
) -> None:
    ours = minilm.encode(ENGLISH)
    theirs = torch.from_numpy(minilm_reference.encode(ENGLISH))
    assert ours.shape == (10, 384) and ours.dtype == torch.float32
    cosines = F.cosine_similarity(ours, theirs, dim=-1)
    assert cosines.min().item() >= 0.999, cosines
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_japanese_pair_matches_sentence_transformers(
    minilm: SentenceEncoder, minilm_reference
) -> None:
    ours = minilm.encode(JAPANESE)
    theirs = torch.from_numpy(minilm_reference.encode(JAPANESE))
    cosines = F.cosine_similarity(ours, theirs, dim=-1)
    assert cosines.min().item() >= 0.999, cosines
    # The pair's similarity to each other is the reference's too.
    ours_pair = F.cosine_similarity(ours[:1], ours[1:]).item()
    theirs_pair = F.cosine_similarity(theirs[:1], theirs[1:]).item()
    assert ours_pair == pytest.approx(theirs_pair, abs=1e-5)


def test_long_input_is_truncated_to_max_seq_length_as_sentence_transformers_does(
    minilm: SentenceEncoder, minilm_reference
) -> None:
    long_text = " ".join(f"word{i}" for i in range(600))
    assert minilm.max_seq_length == 256
    (ids,) = minilm.tokenize([long_text])
    assert len(ids) == 256 and ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP]
    ours = minilm.encode([long_text, "short"])
    theirs = torch.from_numpy(minilm_reference.encode([long_text, "short"]))
    assert F.cosine_similarity(ours, theirs, dim=-1).min().item() >= 0.999


def test_embeddings_are_unit_vectors_when_modules_json_lists_normalize(
    minilm: SentenceEncoder,
) -> None:
    assert minilm.config.normalize
    norms = minilm.encode(ENGLISH[:3]).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(3))


def test_a_vector_does_not_depend_on_its_batch(minilm: SentenceEncoder) -> None:
    together = minilm.encode(ENGLISH, batch_size=4)
    alone = torch.cat([minilm.encode([text]) for text in ENGLISH])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


# Lengths far apart (1 to 256 tokens), shuffled, so the length buckets reorder them.
MIXED = [
    JAPANESE[0] * 24,  # cut to 256 tokens
    "short",
    ENGLISH[3] + " " + ENGLISH[4],
    ENGLISH[0],
    JAPANESE[1],
    " ".join(ENGLISH),
    ENGLISH[1],
    "",
    ENGLISH[6],
    ENGLISH[2],
    JAPANESE[0] * 3,
    ENGLISH[7],
]


def test_vectors_come_back_in_input_order_and_padding_changes_none(
    minilm: SentenceEncoder,
) -> None:
    alone = torch.cat([minilm.encode([text]) for text in MIXED])  # no padding at all
    lengths = [len(ids) for ids in minilm.tokenize(MIXED)]
    buckets = length_batches(lengths)
    assert any(lengths[b[-1]] < lengths[b[0]] for b in buckets)  # some rows are padded
    bucketed = minilm.encode(MIXED)
    one_batch = minilm.encode(MIXED, batch_size=len(MIXED))  # all padded to 256 tokens
    torch.testing.assert_close(bucketed, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(one_batch, alone, atol=1e-5, rtol=0)
    reversed_order = minilm.encode(MIXED[::-1])
    torch.testing.assert_close(reversed_order.flip(0), alone, atol=1e-5, rtol=0)


def test_length_buckets_cover_every_input_once_and_pad_little() -> None:
    lengths = [5, 256, 14, 6, 256, 13, 4, 200, 12, 180, 11, 256, 7, 7, 1, 230]
    batches = length_batches(lengths, batch_tokens=600)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        width = lengths[batch[0]]
        assert all(lengths[i] <= width for i in batch)  # padded to its first, the longest
        assert all(width - lengths[i] < MAX_PADDING * width for i in batch)
        assert len(batch) == 1 or len(batch) * width <= 600
    assert [lengths[b[0]] for b in batches] == sorted(
        (lengths[b[0]] for b in batches), reverse=True
    )
    assert [[lengths[i] for i in b] for b in batches][:3] == [[256, 256], [256, 230], [200, 180]]
    # A batch size: that many per batch, longest first, whatever their lengths.
    fixed = length_batches(lengths, batch_size=5)
    assert [len(b) for b in fixed] == [5, 5, 5, 1]
    assert [lengths[i] for i in fixed[0]] == [256, 256, 256, 230, 200]


def test_bfloat16_matches_sentence_transformers_within_cosine_0999(
    default_encoder_dir: Path, minilm_reference
) -> None:
    bf16 = SentenceEncoder.from_dir(default_encoder_dir, device="cpu", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    # The residual stream, LayerNorms and pooling stay float32; only the matmuls round.
    assert bf16.model.embed_norm.weight.dtype == torch.float32
    texts = ENGLISH + JAPANESE + MIXED[:5]
    ours = bf16.encode(texts)
    assert ours.dtype == torch.float32
    theirs = torch.from_numpy(minilm_reference.encode(texts))
    assert F.cosine_similarity(ours, theirs, dim=-1).min().item() >= 0.999


def test_the_default_dtype_is_the_fast_one_for_this_machine(default_encoder_dir: Path) -> None:
    encoder = SentenceEncoder.from_dir(default_encoder_dir, device="cpu")
    fast = hardware.cpu_has_fast_bf16()
    assert encoder.dtype == (torch.bfloat16 if fast else torch.float32)


@pytest.mark.parametrize(
    ("flags", "dtype"),
    [
        ({"avx2", "fma"}, torch.float32),  # bf16 is emulated there: slower than float32
        ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
        ({"avx2", "avx512f", "amx_tile", "amx_bf16"}, torch.bfloat16),
    ],
)
def test_the_cpu_dtype_follows_the_cpu_flags(
    flags: set[str], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stands in for /proc/cpuinfo of CPUs other than the one the tests run on.
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert encoder_dtype(torch.device("cpu")) == dtype


def test_an_unknown_dtype_is_refused(default_encoder_dir: Path) -> None:
    with pytest.raises(ModelFormatError, match="dtype 'int8' is not supported; choose one of"):
        SentenceEncoder.from_dir(default_encoder_dir, device="cpu", dtype="int8")


def test_similar_sentences_are_closer_than_unrelated_ones(minilm: SentenceEncoder) -> None:
    a, b, c = minilm.encode(["How do I reset my password?", "I forgot my password", ENGLISH[5]])
    assert F.cosine_similarity(a, b, dim=0) > F.cosine_similarity(a, c, dim=0) + 0.3


def test_encode_ids_takes_token_ids_as_they_are(minilm: SentenceEncoder) -> None:
    ids = minilm.tokenize(ENGLISH[:2])
    torch.testing.assert_close(minilm.encode_ids(ids), minilm.encode(ENGLISH[:2]))


# ---- other sentence-transformers directories (random BERTs written here) --------------------


def write_tiny_encoder(
    path: Path,
    tokenizer_from: Path,
    pooling: dict,
    normalize: bool = False,
    max_seq_length: int = 16,
    seed: int = 0,
) -> Path:
    """A random 2-layer BERT as a sentence-transformers directory, with MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tokenizer_from / name, path / name)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, **pooling})
    )
    (path / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
    )
    return path


POOLINGS = {
    "cls": {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
    "max": {"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False},
    "mean_sqrt_len": {"pooling_mode_mean_sqrt_len_tokens": True, "pooling_mode_mean_tokens": False},
    "weightedmean": {"pooling_mode": "weightedmean"},
    "lasttoken": {"pooling_mode": "lasttoken"},
    "cls+mean": {"pooling_mode": ["cls", "mean"]},
}


@pytest.mark.parametrize("pooling", list(POOLINGS))
def test_pooling_modes_match_sentence_transformers(
    pooling: str, tmp_path: Path, default_encoder_dir: Path
) -> None:
    path = write_tiny_encoder(tmp_path / "tiny", default_encoder_dir, POOLINGS[pooling])
    texts = ENGLISH[:4] + [" ".join(["long"] * 40)]  # the last is cut to 16 tokens
    encoder = SentenceEncoder.from_dir(path, device="cpu", dtype="float32")
    assert not encoder.config.normalize and encoder.max_seq_length == 16
    ours = encoder.encode(texts, batch_size=2)
    theirs = reference(path, texts)
    assert ours.shape == theirs.shape == (5, 64 if pooling == "cls+mean" else 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_normalize_module_of_a_tiny_encoder(tmp_path: Path, default_encoder_dir: Path) -> None:
    path = write_tiny_encoder(
        tmp_path / "tiny", default_encoder_dir, {"pooling_mode": "mean"}, normalize=True
    )
    ours = SentenceEncoder.from_dir(path, device="cpu", dtype="float32").encode(ENGLISH[:3])
    torch.testing.assert_close(ours, reference(path, ENGLISH[:3]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(3))


def test_a_missing_tokenizer_json_falls_back_to_vocab_txt(
    tmp_path: Path, default_encoder_dir: Path
) -> None:
    path = shutil.copytree(default_encoder_dir, tmp_path / "minilm")
    (path / "tokenizer.json").unlink()
    encoder = SentenceEncoder.from_dir(path, device="cpu")
    full = SentenceEncoder.from_dir(default_encoder_dir, device="cpu")
    texts = ENGLISH[:3] + JAPANESE
    assert encoder.tokenize(texts) == full.tokenize(texts)


# ---- directories that are not sentence encoders --------------------------------------------


@pytest.fixture
def minilm_copy(tmp_path: Path, default_encoder_dir: Path) -> Path:
    """A copy of the default model's directory without its weights (tests add or break files)."""
    path = tmp_path / "copy"
    shutil.copytree(default_encoder_dir, path, ignore=shutil.ignore_patterns("*.safetensors"))
    (path / "model.safetensors").symlink_to(default_encoder_dir / "model.safetensors")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ModelFormatError) as excinfo:
        SentenceEncoder.from_dir(path, device="cpu")
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    assert "not a directory" in error_of(tmp_path / "nothing")


def test_a_directory_without_modules_json_is_refused(minilm_copy: Path) -> None:
    (minilm_copy / "modules.json").unlink()
    assert "is not a sentence-transformers model directory: it has no modules.json" in error_of(
        minilm_copy
    )


def test_a_non_bert_architecture_is_refused(minilm_copy: Path) -> None:
    config = json.loads((minilm_copy / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (minilm_copy / "config.json").write_text(json.dumps(config))
    message = error_of(minilm_copy)
    assert "model_type 'llama' (LlamaForCausalLM) is not a BERT encoder" in message


def test_missing_weights_are_refused(minilm_copy: Path) -> None:
    (minilm_copy / "model.safetensors").unlink()
    assert "has no *.safetensors weights" in error_of(minilm_copy)


def test_missing_tokenizer_is_refused(minilm_copy: Path) -> None:
    (minilm_copy / "tokenizer.json").unlink()
    (minilm_copy / "vocab.txt").unlink()
    assert "has no tokenizer.json (nor a vocab.txt)" in error_of(minilm_copy)


def test_an_unsupported_module_is_refused(minilm_copy: Path) -> None:
    modules = json.loads((minilm_copy / "modules.json").read_text())
    modules.append(
        {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    )
    (minilm_copy / "modules.json").write_text(json.dumps(modules))
    message = error_of(minilm_copy)
    assert "Transformer -> Pooling -> Normalize -> Dense are not supported" in message


def test_an_unknown_pooling_mode_is_refused(minilm_copy: Path) -> None:
    (minilm_copy / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "median"}))
    assert "pooling mode 'median' is not supported" in error_of(minilm_copy)


def test_weights_of_another_shape_are_refused(tmp_path: Path, default_encoder_dir: Path) -> None:
    path = write_tiny_encoder(tmp_path / "tiny", default_encoder_dir, {"pooling_mode": "mean"})
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(config))
    message = error_of(path)
    assert "intermediate.dense" in message and "config.json says (128" in message


def test_config_reads_without_loading_weights(default_encoder_dir: Path) -> None:
    config = SentenceEncoderConfig.from_dir(default_encoder_dir)
    assert (config.dimension, config.max_seq_length, config.normalize) == (384, 256, True)
    assert config.pooling.modes == ("mean",)
