"""`sorai serve`'s memory: what its process imports and what the loaded default model holds.

No RSS figure is asserted (machines differ; benchmarks/bench_memory.py measures it): these check
the causes instead, on the real start-up path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Modules `sorai serve` must not import: each costs tens of MB and seconds of start-up, and
# nothing a served chat model or the lazily loaded embedding model needs comes from them.
NOT_IMPORTED = ("transformers", "sentence_transformers", "peft", "datasets", "accelerate")

# `sorai serve` as the command runs it, up to the point where it would start listening: then
# it reports its modules and its model's bytes by dtype and returns.
SERVE_UNTIL_LISTENING = """
import json, sys
import sorai.cli, sorai.server.serve as serve_module

def report(engine, settings, **kwargs):
    model = engine.engine.model
    by_dtype = {}
    seen = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        key = str(t.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + storage.nbytes()
    print(json.dumps({
        "modules": sorted(sys.modules),
        "by_dtype": by_dtype,
        "nibbles": sum(name.endswith(".nibbles") for name, _ in model.named_buffers()),
        "kv_tokens": engine.engine.cache.num_blocks * engine.engine.cache.block_size,
        "context_window": model.config.context_length,
    }))
    return 0

serve_module.serve = report
sys.exit(sorai.cli.main(sys.argv[1:]))
"""


def test_serve_imports_no_heavy_library_and_keeps_the_weights_low_bit(default_gguf: Path) -> None:
    command = [sys.executable, "-c", SERVE_UNTIL_LISTENING, "serve", "--model", str(default_gguf)]
    command += ["--host", "127.0.0.1", "--port", "0", "--embedding-model", "none"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ}, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert not [m for m in NOT_IMPORTED if m in facts["modules"]]
    by_dtype = facts["by_dtype"]
    total = sum(by_dtype.values())
    # The Q4_1 blocks stay int4 (uint8 codes, fp16 scales), the Q8_0 table int8: float32 is
    # left to norms and per-row scales, never a dequantized copy of a matrix.
    assert by_dtype.get("float32", 0) < 0.01 * total, by_dtype
    assert by_dtype.get("uint8", 0) + by_dtype.get("int8", 0) > 0.7 * total, by_dtype
    # The int4 codes are read back from the kernel's packing, not kept twice, where this
    # machine's packing layout is known (every x86 build of torch this project runs on).
    from sorai.model.quant.linear import packed_row_block

    if packed_row_block(64 * 3) is not None:
        assert facts["nibbles"] == 0
    # The KV cache defaults to one context window (8192 tokens for the default model), not 1 GiB.
    assert facts["kv_tokens"] == facts["context_window"] == 8192
