"""OpenMP's wait policy by use: the process `sorai train` trains in spins (ACTIVE), a server's
and the Python engine's threads sleep (PASSIVE), and the user's own OMP_WAIT_POLICY wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sorai import openmp

from .test_trainer import config


def _environment(policy: str | None) -> dict[str, str]:
    """os.environ with OMP_WAIT_POLICY the user's `policy`, or (None) sorai's serving choice
    inherited from a parent that imported sorai, as a script that then runs `sorai train`."""
    env = {k: v for k, v in os.environ.items() if k not in (openmp.VARIABLE, openmp.MARK)}
    if policy is None:
        return {**env, openmp.VARIABLE: openmp.SERVE, openmp.MARK: openmp.SERVE}
    return {**env, openmp.VARIABLE: policy}


@pytest.mark.parametrize(
    ("policy", "logged"),
    [
        (None, "OMP_WAIT_POLICY=ACTIVE (sorai's choice for training"),
        ("PASSIVE", "OMP_WAIT_POLICY=PASSIVE (your OMP_WAIT_POLICY)"),
    ],
    ids=["sorai-chooses-active", "the-users-wins"],
)
def test_sorai_train_runs_with_spinning_threads_unless_the_user_chose(
    policy: str | None, logged: str, tiny_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    cfg = config(tiny_model, chat_file, tmp_path / "run", train={"max_steps": 1})
    cfg.save(tmp_path / "config.yaml")
    command = [sys.executable, "-m", "sorai.cli", "train", str(tmp_path / "config.yaml"), "-q"]
    done = subprocess.run(command, capture_output=True, text=True, env=_environment(policy))
    assert done.returncode == 0, done.stderr[-3000:]
    # The line says what the process chose before torch (and with it libgomp) loaded:
    # choose() changes nothing once torch is in sys.modules.
    lines = done.stderr.splitlines()
    assert any(line.startswith(f"OpenMP: {logged}") for line in lines), done.stderr


def test_the_policy_follows_the_process_purpose_and_what_the_user_set() -> None:
    script = (
        "import os, sys, sorai\n"
        "from sorai import openmp\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), end=' ')\n"
        "openmp.choose(openmp.TRAIN)\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), end=' ')\n"
        "if sys.argv[1:] == ['torch']:\n"
        "    import torch\n"
        "    openmp.choose(openmp.SERVE)\n"  # too late: libgomp has read the variable
        "print(openmp.in_effect(), list(openmp.peer_environment(os.environ)).count("
        "'OMP_WAIT_POLICY'))\n"
    )

    def run(env: dict[str, str], *args: str) -> list[str]:
        command = [sys.executable, "-c", script, *args]
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        return done.stdout.split()

    unset = {k: v for k, v in os.environ.items() if k not in (openmp.VARIABLE, openmp.MARK)}
    # A llama.cpp peer gets neither sorai's choice nor its mark, but the user's own value.
    assert run(unset, "torch") == ["PASSIVE", "ACTIVE", "ACTIVE", "0"]
    assert run(_environment(None)) == ["PASSIVE", "ACTIVE", "ACTIVE", "0"]
    assert run(_environment("PASSIVE")) == ["PASSIVE", "PASSIVE", "PASSIVE", "1"]


def test_training_spins_briefly_unless_the_user_set_a_spin_count() -> None:
    script = (
        "import os, sorai\n"
        "from sorai import openmp\n"
        "openmp.choose(openmp.TRAIN)\n"
        "peer = openmp.peer_environment(os.environ)\n"
        "print(os.environ.get('GOMP_SPINCOUNT'), peer.get('GOMP_SPINCOUNT'))\n"
    )
    unset = {
        k: v
        for k, v in os.environ.items()
        if k not in (openmp.VARIABLE, openmp.MARK, openmp.SPINCOUNT, openmp.SPIN_MARK)
    }

    def run(env: dict[str, str]) -> list[str]:
        command = [sys.executable, "-c", script]
        return subprocess.run(command, capture_output=True, text=True, env=env).stdout.split()

    # sorai's spin count for training; a llama.cpp peer does not inherit it.
    assert run(unset) == [openmp.TRAIN_SPINCOUNT, "None"]
    # The user's own count stays, for training and for the peer.
    assert run({**unset, openmp.SPINCOUNT: "5"}) == ["5", "5"]
