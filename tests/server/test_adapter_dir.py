"""--adapter-dir scanning (sorai/server/adapters.py) on a tiny model: what fits is added, what
does not is logged once, not at each rescan, and tried again when its files change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sorai.engine.adapters import AdapterRegistry
from sorai.model.weights import load_hf_dir
from sorai.server.adapters import scan_adapter_dir
from tests.engine.lora_files import EIGHT, Spec, write_adapter
from tests.model.reference import write_hf_checkpoint


def test_an_adapter_that_does_not_fit_is_logged_once_until_its_files_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = load_hf_dir(write_hf_checkpoint(tmp_path / "tiny", "llama"), torch.float32)
    registry = AdapterRegistry(model, max_loras=2, max_lora_rank=8)
    watched = tmp_path / "watched"
    write_adapter(watched / "big", model, Spec(16, 16, ("q_proj",)), seed=0)  # rank above 8
    write_adapter(watched / "ok", model, EIGHT[0], seed=1)
    with caplog.at_level("WARNING", logger="sorai.server"):
        assert scan_adapter_dir(registry, watched) == ["ok"]
        assert scan_adapter_dir(registry, watched) == []  # the periodic rescans
        assert scan_adapter_dir(registry, watched) == []
        skipped = [r for r in caplog.records if "skipping adapter" in r.getMessage()]
        assert len(skipped) == 1 and "rank 16" in skipped[0].getMessage()
        write_adapter(watched / "big", model, Spec(4, 8, ("q_proj",)), seed=0)  # fixed
        assert scan_adapter_dir(registry, watched) == ["big"]
