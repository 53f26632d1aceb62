"""The benchmarks' llama.cpp peer: the vendored commit it reports, the server it starts, and the
check that both peers' answers are --max-tokens long under ignore_eos."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def peer():
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their siblings by name
    import llama_cpp_peer

    return llama_cpp_peer


CHANGELOG = """# Changelog

## [Unreleased]

## [{version}]

- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098
- fix: something else

## [0.3.35]

- feat: update llama.cpp to ggml-org/llama.cpp@4df29be4f
"""


def _sdist(root: Path, version: str, changelog: str) -> None:
    source = root / "src"
    (source / f"llama_cpp_python-{version}").mkdir(parents=True)
    (source / f"llama_cpp_python-{version}" / "CHANGELOG.md").write_text(changelog)
    with tarfile.open(root / f"llama_cpp_python-{version}.tar.gz", "w:gz") as tar:
        tar.add(source / f"llama_cpp_python-{version}", arcname=f"llama_cpp_python-{version}")


def test_version_names_the_commit_of_the_pinned_sdist(peer, tmp_path: Path) -> None:
    _sdist(tmp_path, peer.SDIST_VERSION, CHANGELOG.format(version=peer.SDIST_VERSION))
    assert peer.vendored_commit(tmp_path) == "0c1e57098"  # not the older release's commit
    assert peer.version_of(tmp_path) == (
        f"0c1e57098 (vendored by llama-cpp-python {peer.SDIST_VERSION})"
    )


def test_version_without_a_commit_says_so(peer, tmp_path: Path) -> None:
    _sdist(tmp_path, peer.SDIST_VERSION, CHANGELOG.format(version="9.9.9"))
    assert peer.vendored_commit(tmp_path) == ""
    assert peer.version_of(tmp_path).startswith("commit unknown")


def test_build_progress_is_the_last_ninja_step(peer, tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    log.write_text("$ cmake --build\n[1/210] Building C\n[47/210] Building CXX\nwarning: x\n")
    assert peer.build_progress(log) == "step [47/210]"
    assert peer.build_progress(tmp_path / "missing.log") == ""


def test_llama_server_command_is_the_reference_run(peer) -> None:
    import bench_serving

    command = bench_serving.llama_server_command(Path("/bin/llama-server"), Path("m.gguf"), 8080, 0)
    text = " ".join(command)
    assert "-m m.gguf" in text and "--host 127.0.0.1 --port 8080" in text
    assert "-np 16 -c 8192" in text
    assert command[-2:] == ["-t", str(peer.cores())]  # every core unless told
    assert bench_serving.llama_server_command(Path("s"), Path("m"), 1, 3)[-2:] == ["-t", "3"]


def test_answers_of_another_length_are_counted(peer) -> None:
    import bench_serving

    def done(tokens: int) -> bench_serving.RequestResult:
        return bench_serving.RequestResult(
            index=0, output_tokens=tokens, ttft=0.1, e2e=1.0, finished=True, usage_reported=True
        )

    results = [done(64), done(64), done(12)]  # one peer stopped at EOS
    assert bench_serving.summarize("p", 1, results, 2.0, expected_tokens=64).wrong_length == 1
    assert bench_serving.summarize("p", 1, results, 2.0, expected_tokens=None).wrong_length == 0
