"""Loading: device choice (defaults and clear errors for devices that are not there), and an
embedding model told apart from a chat model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sorai.errors import DeviceError, ModelFormatError
from sorai.model.config import embedding_architecture
from sorai.model.loader import load_model, read_config, resolve_device


def test_default_device_is_the_gpu_when_present_else_the_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected


def test_malformed_device_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match="'foo' is not valid"):
        resolve_device("foo")


def test_missing_cuda_device_is_a_clear_error() -> None:
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(DeviceError, match="is not available"):
        resolve_device(missing)


def test_unsupported_device_type_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match="not supported"):
        resolve_device("meta")


def _model_dir(path: Path, files: dict[str, object]) -> Path:
    for name, value in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(json.dumps(value))
    return path


def test_embedding_architecture_tells_embedding_models_from_the_rest(tmp_path: Path) -> None:
    st = {"modules.json": [{"path": ""}, {"path": "1_Pooling"}]}
    assert embedding_architecture(_model_dir(tmp_path / "st", st)) == "sentence-transformers"
    bert = {**st, "config.json": {"model_type": "bert"}}
    assert embedding_architecture(_model_dir(tmp_path / "st-bert", bert)) == "bert"
    roberta = {"config.json": {"model_type": "roberta"}}
    assert embedding_architecture(_model_dir(tmp_path / "roberta", roberta)) == "roberta"
    llama = {"config.json": {"model_type": "llama"}}
    assert embedding_architecture(_model_dir(tmp_path / "llama", llama)) is None
    assert embedding_architecture(_model_dir(tmp_path / "empty", {})) is None
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    assert embedding_architecture(tmp_path / "x.gguf") is None
    assert embedding_architecture(tmp_path / "missing") is None


def test_loading_an_encoder_says_it_is_an_embedding_models_architecture(tmp_path: Path) -> None:
    config = {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": 384,
        "intermediate_size": 1536,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
    }
    path = _model_dir(tmp_path / "bert", {"config.json": config})
    for load in (read_config, lambda p: load_model(p, device="cpu")):
        with pytest.raises(ModelFormatError) as excinfo:
            load(path)
        assert str(excinfo.value) == (
            "model_type 'bert' is an encoder, the architecture of an embedding model, not of a "
            "chat model; supported: llama, mistral, qwen2"
        )
