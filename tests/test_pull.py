"""`sorai pull hf:...` against a Hub double on loopback (tests/hub_double.py): a tiny random
Llama checkpoint with the default model's tokenizer is pulled, registered, loaded and generates;
dropped transfers resume; bad repositories, files, revisions and checksums fail in one line
with nothing registered."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import sorai
from sorai import hub, registry
from sorai.errors import HubError
from tests.hub_double import FakeHub, FakeRepo, tiny_checkpoint_files

MAIN = "0123456789abcdef0123456789abcdef01234567"
V1 = "fedcba9876543210fedcba9876543210fedcba98"
GGUF_BYTES = b"GGUF" + bytes(range(256)) * 64


@pytest.fixture(scope="module")
def fake_hub(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    files = tiny_checkpoint_files(default_gguf, tmp_path_factory.mktemp("tiny-repo"))
    hub_double = FakeHub()
    hub_double.repos["org/tiny"] = FakeRepo(files, commit=MAIN, branches={"main": MAIN, "v1": V1})
    hub_double.repos["org/quants"] = FakeRepo(
        {"tiny.Q4_0.gguf": GGUF_BYTES, "README.md": b"# quants\n"}, commit=MAIN
    )
    yield hub_double
    hub_double.close()


@pytest.fixture
def home(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("SORAI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SORAI_REGISTRY")  # the registry of this home, looked at below
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    fake_hub.seen.clear()
    yield tmp_path / "home"
    fake_hub.faults.clear()


def test_pull_registers_a_checkpoint_that_loads_and_generates(
    home: Path, fake_hub: FakeHub, sorai_main
) -> None:
    result = sorai_main("pull", "hf:org/tiny")
    assert result.returncode == 0, result.stderr
    entry = registry.get(home, "org/tiny")
    assert entry is not None and entry.revision == MAIN
    assert entry.source == f"hf:org/tiny@{MAIN}" and entry.format == "safetensors"
    assert result.stdout.strip() == entry.path
    assert "%|" not in result.stderr  # no progress bar when stderr is no terminal
    fetched = {p.name for p in Path(entry.path).iterdir()}
    assert "model.safetensors" in fetched and "tokenizer.json" in fetched
    assert not {"README.md", "pytorch_model.bin"} & fetched  # only what sorai loads
    weights = (Path(entry.path) / "model.safetensors").read_bytes()
    assert entry.files["model.safetensors"] == f"sha256:{hashlib.sha256(weights).hexdigest()}"
    repo_calls = [s for s in fake_hub.seen if "org/tiny" in s.path]
    assert repo_calls and all(s.authorization == "Bearer hf_test_token" for s in repo_calls)
    assert not (home / "models" / ".partial" / f"org--tiny@{MAIN}").exists()

    llm = sorai.load("hf:org/tiny")  # and by its registry name
    out = llm.generate("Hello", max_tokens=4, temperature=0, ignore_eos=True)
    assert out.completion_tokens == 4
    assert hub.resolve("org/tiny") == Path(entry.path)

    again = sorai_main("pull", "hf:org/tiny")
    assert again.returncode == 0 and "up to date" in again.stderr
    assert not fake_hub.gets("model.safetensors")[1:]  # nothing fetched twice


def test_lfs_files_redirected_to_a_cdn_get_no_token(home: Path, fake_hub: FakeHub) -> None:
    fake_hub.cdn = True
    try:
        path = hub.pull_model("hf:org/quants/tiny.Q4_0.gguf")
    finally:
        fake_hub.cdn = False
    assert path.read_bytes() == GGUF_BYTES
    cdn = [s for s in fake_hub.seen if s.path.startswith("/cdn/")]
    assert [s.method for s in cdn] == ["GET"] and cdn[0].authorization is None
    head = [s for s in fake_hub.seen if s.method == "HEAD" and "tiny.Q4_0.gguf" in s.path]
    assert head[0].authorization == "Bearer hf_test_token"


def test_a_revision_is_pinned_in_the_record(home: Path) -> None:
    path = hub.pull_model("hf:org/tiny@v1")
    entry = registry.get(home, "org/tiny")
    assert entry is not None and entry.revision == V1 and path.name == V1
    assert hub.registered("hf:org/tiny@v1") == entry
    assert hub.registered("hf:org/tiny@" + V1[:10]) == entry
    assert hub.registered("hf:org/tiny@main") is None  # another revision: pulled on use


def test_a_named_gguf_file(home: Path, sorai_main) -> None:
    for args in (["hf:org/quants/tiny.Q4_0.gguf"], ["hf:org/quants", "--file", "tiny.Q4_0.gguf"]):
        result = sorai_main("pull", *args)
        assert result.returncode == 0, result.stderr
        path = Path(result.stdout.strip())
        assert path.name == "tiny.Q4_0.gguf" and path.read_bytes() == GGUF_BYTES
    entry = registry.get(home, "org/quants/tiny.Q4_0.gguf")
    assert entry is not None and entry.format == "gguf"


def test_a_dropped_transfer_resumes_on_the_next_pull(home: Path, fake_hub: FakeHub) -> None:
    # The connection drops halfway, the retry meets a 503: the pull fails, keeping its part.
    fake_hub.faults["model.safetensors"] = ["drop", "503"]
    with pytest.raises(HubError, match="HTTP 503 for model.safetensors"):
        hub.pull_model("hf:org/tiny")
    assert registry.get(home, "org/tiny") is None
    part = home / "models" / ".partial" / f"org--tiny@{MAIN}" / "model.safetensors.part"
    kept = part.stat().st_size
    size = len(fake_hub.repos["org/tiny"].files["model.safetensors"])
    assert 0 < kept < size
    assert fake_hub.gets("model.safetensors")[-1].range == f"bytes={kept}-"

    path = hub.pull_model("hf:org/tiny")
    assert fake_hub.gets("model.safetensors")[-1].range == f"bytes={kept}-"
    data = (path / "model.safetensors").read_bytes()
    assert data == fake_hub.repos["org/tiny"].files["model.safetensors"]
    assert registry.get(home, "org/tiny") is not None


def test_a_checksum_mismatch_registers_nothing(home: Path, fake_hub: FakeHub) -> None:
    fake_hub.faults["model.safetensors"] = ["corrupt"]
    with pytest.raises(HubError, match="checksum mismatch for model.safetensors: expected sha256"):
        hub.pull_model("hf:org/tiny")
    assert registry.get(home, "org/tiny") is None
    assert not (home / "models" / "hf").exists()
    assert not list((home / "models").rglob("model.safetensors*"))  # no half-checked bytes


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hf:org/missing", "no repository 'org/missing'"),
        ("hf:org/tiny@v9", "org/tiny has no revision 'v9'"),
        ("hf:org/quants/other.gguf", "org/quants has no file 'other.gguf' (its .gguf files: "),
        ("hf:org/quants", "no config.json, so it is no Transformers checkpoint; for a GGUF"),
        ("hf:", "is not a Hub model"),
        ("org/tiny", "pull a known model"),
    ],
)
def test_bad_pulls_fail_in_one_line(home: Path, sorai_main, spec: str, message: str) -> None:
    result = sorai_main("pull", spec)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not registry.load(home)


def test_the_registry_is_rewritten_whole(home: Path) -> None:
    hub.pull_model("hf:org/quants/tiny.Q4_0.gguf")
    raw = json.loads((home / "registry.json").read_text())
    assert raw["version"] == registry.FORMAT_VERSION and list(raw["entries"]) == [
        "org/quants/tiny.Q4_0.gguf"
    ]
    assert not list(home.glob(".registry-*"))  # no temporary file left beside it
