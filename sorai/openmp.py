"""OpenMP's wait policy for this process, chosen by what the process does, before torch loads.

libgomp reads OMP_WAIT_POLICY once, as it loads with torch, so the choice is made in the
environment before then: `import sorai` chooses PASSIVE (serving and the Python engine), the
process that `sorai train` trains in chooses ACTIVE. A value the user set wins in both.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

VARIABLE = "OMP_WAIT_POLICY"
# libgomp's spin count before an idle thread sleeps; when set, it overrides the policy's own.
SPINCOUNT = "GOMP_SPINCOUNT"

# Idle threads sleep at once. With libgomp's default (spin ~300000 iterations, then sleep) or
# ACTIVE, idle threads spin and take the time slices a working thread needs: on 2 shared cores
# a server's decode step ran 5-10x slower (benchmarks/README.md, bench_omp_policy.py).
SERVE = "PASSIVE"
# Idle threads spin until the next parallel region: a training run that has the machine to
# itself runs its steps up to ~2% faster (measured quiet: the many short regions of a step start
# without a wake-up).
TRAIN = "ACTIVE"

# With TRAIN, idle threads spin only this long (libgomp iterations, tens of microseconds) before
# sleeping, unless the user set GOMP_SPINCOUNT: on a quiet 2-core EPYC as fast as ACTIVE's
# unbounded spin (LoRA 134.6 tok/s both, PASSIVE 132.6), and with other jobs on the cores 1.40x
# PASSIVE where the unbounded spin fell to 0.56x (bench_omp_policy.py).
TRAIN_SPINCOUNT = "10000"
SPIN_MARK = "SORAI_CHOSE_GOMP_SPINCOUNT"

# Set beside OMP_WAIT_POLICY to the value sorai chose, so that a child process (torchrun's
# workers, a `sorai train` started from a script that imported sorai) inherits it as sorai's
# choice, to make its own, and not as the user's.
MARK = "SORAI_CHOSE_OMP_WAIT_POLICY"

# Read once, as sorai is first imported: the user's own value (None when unset), and whether
# torch, and with it libgomp, had loaded already (then nothing chosen here takes effect).
_found = os.environ.get(VARIABLE)
_USER = None if _found is not None and _found == os.environ.get(MARK) else _found
_LOADED_BEFORE = "torch" in sys.modules
_AT_LOAD = _found if _LOADED_BEFORE else None
_chosen: str | None = None


def choose(policy: str) -> str | None:
    """Set OMP_WAIT_POLICY to `policy` for this process unless the user set it or OpenMP
    has loaded; returns the policy OpenMP runs with (None: unset, libgomp's default)."""
    global _chosen
    if _USER is None and not _LOADED_BEFORE and "torch" not in sys.modules:
        os.environ[VARIABLE] = os.environ[MARK] = policy
        _chosen = policy
        _choose_spincount(policy)
    return in_effect()


def _choose_spincount(policy: str) -> None:
    found = os.environ.get(SPINCOUNT)
    if found is not None and found != os.environ.get(SPIN_MARK):
        return  # the user's own
    if policy == TRAIN:
        os.environ[SPINCOUNT] = os.environ[SPIN_MARK] = TRAIN_SPINCOUNT
    else:  # not a training parent's choice inherited
        os.environ.pop(SPINCOUNT, None)
        os.environ.pop(SPIN_MARK, None)


def in_effect() -> str | None:
    """The policy this process's OpenMP runs with, or will once torch loads (None: unset)."""
    if _LOADED_BEFORE:
        return _AT_LOAD
    return _USER if _USER is not None else _chosen


def peer_environment(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for another program's process (llama.cpp), which runs with its own defaults:
    without the OMP_WAIT_POLICY sorai chose (the user's own value stays)."""
    mark, spin_mark = env.get(MARK), env.get(SPIN_MARK)
    child = {k: v for k, v in env.items() if k not in (MARK, SPIN_MARK)}
    if spin_mark is not None and child.get(SPINCOUNT) == spin_mark:
        del child[SPINCOUNT]
    if mark is not None and child.get(VARIABLE) == mark:
        del child[VARIABLE]
    return child


def describe() -> str:
    """One line for a log or banner: the policy in effect and who chose it."""
    policy = in_effect()
    if _LOADED_BEFORE:
        source = "torch was loaded before sorai"
    elif _USER is not None:
        source = f"your {VARIABLE}"
    else:
        purpose = "training" if policy == TRAIN else "serving"
        source = f"sorai's choice for {purpose}; set {VARIABLE} to override"
    line = f"{VARIABLE}={policy or 'unset'} ({source})"
    spins = os.environ.get(SPINCOUNT)
    if spins is not None:
        line += f", {SPINCOUNT}={spins}"
    return line
