"""The benchmarks that read another benchmark's printed lines parse what it prints now."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_omp_policy_reads_the_decode_steps_bench_decode_step_prints() -> None:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their siblings by name
    import bench_decode_step
    import bench_omp_policy

    w = {"step": 41.0, "forward": 40.5, "sampler": 0.2, "rest": 0.3}
    lines = ["batch 1:", bench_decode_step.wall_line("auto", 1, w, 1, 41.0)]
    lines += [
        "",
        "batch 16:",
        bench_decode_step.wall_line("float16", 2, w | {"step": 85.5}, 16, 41.0),
    ]
    # Seen failing: the KV dtype added to the line hid every decode figure from the parser.
    assert bench_omp_policy.parse_decode("\n".join(lines)) == {(1, 1): 41.0, (16, 2): 85.5}
