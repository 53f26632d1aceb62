"""The table lines up and adds up; sizes read as GiB and MiB."""

from __future__ import annotations

from sorai.train.estimate import estimate_memory, format_bytes
from tests.train.estimate.models import TINY, B, T


def test_table_lines_up_and_adds_up() -> None:
    estimate = estimate_memory(TINY, method="full", micro_batch_size=B, seq_len=T)
    assert estimate.total == sum(
        (estimate.weights, estimate.gradients, estimate.optimizer, estimate.activations)
    )
    assert sum(estimate.activation_parts.values()) == estimate.activations
    table = estimate.table()
    lines = table.splitlines()
    assert lines[0] == "memory per device (single device)"
    for kind in ("weights", "gradients", "optimizer", "activations", "total"):
        assert any(line.startswith(kind) for line in lines)
    assert lines[-1].startswith("total") and format_bytes(estimate.total) in lines[-1]
    sized = [line for line in lines[1:] if "iB" in line]
    ends = {line.index("iB") for line in sized}
    assert len(ends) == 1, table  # the size column is right-aligned
    report = estimate.report()
    assert report.startswith(table) and "micro-batch 2 x 64 tokens" in report


def test_format_bytes() -> None:
    assert format_bytes(3 * 1024**3) == "3.00 GiB"
    assert format_bytes(1536 * 1024) == "1.5 MiB"
    assert format_bytes(0) == "0.0 MiB"
