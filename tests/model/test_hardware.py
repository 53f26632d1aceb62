"""Machine detection and the dtype `--dtype auto` picks from it."""

import functools
import os
import subprocess
import sys

import pytest
import torch

from sorai.model import hardware


def test_machine_names_this_cpu() -> None:
    m = hardware.machine()
    assert m.cores >= 1 and m.isa
    assert set(m.flags) <= set(hardware.REPORTED_FLAGS)
    assert str(m.cores) in m.describe()


@pytest.mark.parametrize(
    ("flags", "dtype"),
    [
        ({"avx2", "fma"}, torch.float32),
        ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
        ({"avx2", "amx_tile", "amx_bf16"}, torch.bfloat16),
        (set(), torch.float32),  # flags unreadable: the safe choice
    ],
)
def test_auto_dtype_on_the_cpu_follows_bf16_support(monkeypatch, flags, dtype) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    chosen, reason = hardware.auto_dtype(torch.device("cpu"))
    assert chosen == dtype and reason


def test_auto_dtype_is_the_loaders_default(default_gguf) -> None:
    from sorai.model.loader import load_model

    model, _ = load_model(default_gguf)
    assert model.dtype == hardware.auto_dtype(torch.device("cpu"))[0]


def test_import_sorai_makes_openmp_idle_threads_sleep_unless_the_user_chose() -> None:
    script = "import os, sorai; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = functools.partial(subprocess.run, capture_output=True, text=True, check=True)
    assert run([sys.executable, "-c", script], env=env).stdout.strip() == "PASSIVE"
    chosen = {**env, "OMP_WAIT_POLICY": "ACTIVE"}
    assert run([sys.executable, "-c", script], env=chosen).stdout.strip() == "ACTIVE"
