"""Device choice when loading: defaults and clear errors for devices that are not there."""

from __future__ import annotations

import pytest
import torch

from sorai.errors import DeviceError
from sorai.model.loader import resolve_device


def test_default_device_is_the_gpu_when_present_else_the_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected


def test_malformed_device_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match="'foo' is not valid"):
        resolve_device("foo")


def test_missing_cuda_device_is_a_clear_error() -> None:
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(DeviceError, match="is not available"):
        resolve_device(missing)


def test_unsupported_device_type_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match="not supported"):
        resolve_device("meta")
