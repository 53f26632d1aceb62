"""The embeddings benchmark's matmul floor: the encoder's own Linear layers, on the very batch
shapes its encode() runs, and nothing else (the ceiling the benchmark prints rests on it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sorai.model.bert import SentenceEncoder, length_batches

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their siblings by name
    import bench_embeddings

    return bench_embeddings


def test_the_matmul_floor_runs_every_linear_on_the_encoders_batch_shapes(
    bench, default_encoder_dir: Path
) -> None:
    encoder = SentenceEncoder.from_dir(default_encoder_dir, device="cpu", dtype="float32")
    texts = bench.make_queries(40) + bench.make_chunks(3)
    lengths = [len(ids) for ids in encoder.tokenize(texts)]
    expected = [len(b) * lengths[b[0]] for b in length_batches(lengths)]
    # Forward hooks record what the real layers are called with (no stand-in for any part).
    calls: list[tuple[str, tuple[int, ...]]] = []
    handles = [
        module.register_forward_hook(
            lambda m, args, out, name=name: calls.append((name, tuple(args[0].shape)))
        )
        for name, module in encoder.model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        bench.matmul_floor(encoder, texts)()
    finally:
        for handle in handles:
            handle.remove()
    linears = [n for n, m in encoder.model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert [name for name, _ in calls] == linears * len(expected)
    per_batch = len(linears)
    rows = [calls[i * per_batch][1][0] for i in range(len(expected))]
    assert rows == expected
    assert all(shape[0] == rows[i // per_batch] for i, (_, shape) in enumerate(calls))
