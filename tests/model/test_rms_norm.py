"""RMSNorm's C kernel for inference (sorai/model/rms_norm.py): PyTorch's numbers within float32
rounding, a row's result independent of its batch, PyTorch's op wherever a gradient is wanted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sorai import native
from sorai.model import rms_norm
from sorai.model.transformer import RMSNorm

pytestmark = pytest.mark.skipif(
    native.compiler() is None, reason="no C compiler on this machine: PyTorch's op runs"
)


@pytest.mark.parametrize("width", [576, 64, 13])
def test_the_kernel_matches_pytorch_and_a_row_alone_matches_it_in_a_batch(width: int) -> None:
    generator = torch.Generator().manual_seed(width)
    x = torch.randn(1, 17, width, generator=generator) * 3
    weight = torch.randn(width, generator=generator)
    with torch.inference_mode():
        out = rms_norm.normalize(x, weight, 1e-5)
        assert out is not None
        torch.testing.assert_close(out, F.rms_norm(x, (width,), weight, 1e-5))
        for row in (0, 5, 16):
            alone = rms_norm.normalize(x[:, row : row + 1], weight, 1e-5)
            assert torch.equal(alone[0, 0], out[0, row])


def test_strided_rows_read_where_they_lie() -> None:
    x = torch.randn(4, 2, 64)[:, 1]  # rows 128 floats apart
    weight = torch.randn(64)
    with torch.inference_mode():
        out = rms_norm.normalize(x, weight, 1e-6)
    assert out is not None and out.is_contiguous()
    torch.testing.assert_close(out, F.rms_norm(x, (64,), weight, 1e-6))


def test_training_keeps_pytorchs_op_and_its_gradient() -> None:
    norm = RMSNorm(64, 1e-5)
    x = torch.randn(2, 3, 64, requires_grad=True)
    assert rms_norm.normalize(x, norm.weight, norm.eps) is None
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None


def test_inference_runs_the_kernel_and_sorai_native_off_turns_it_off(monkeypatch) -> None:
    norm = RMSNorm(64, 1e-5)
    x = torch.randn(1, 2, 64)
    with torch.inference_mode():
        expected = rms_norm.normalize(x, norm.weight, norm.eps)
        assert expected is not None and torch.equal(norm(x), expected)
    monkeypatch.setenv("SORAI_NATIVE", "off")
    native.load.cache_clear()
    rms_norm._entry.cache_clear()
    try:
        with torch.inference_mode():
            assert rms_norm.normalize(x, norm.weight, norm.eps) is None
            torch.testing.assert_close(norm(x), expected)
    finally:
        monkeypatch.delenv("SORAI_NATIVE")
        native.load.cache_clear()
        rms_norm._entry.cache_clear()


def test_a_bad_sorai_native_value_is_named() -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SORAI_NATIVE", "fast")
        with pytest.raises(Exception, match="SORAI_NATIVE must be one of auto, off, got 'fast'"):
            native.enabled()


def test_tensor_subclasses_keep_pytorchs_op() -> None:
    # A DTensor (tensor/sequence parallel training's evaluation) has no memory of its own at
    # data_ptr(): the kernel read garbage and torchrun's workers died (SIGSEGV) before this
    # check; tests/train/test_parallel.py's tp2-sp layout covers the DTensor itself.
    class Wrapped(torch.Tensor):
        pass

    x = torch.randn(1, 2, 64).as_subclass(Wrapped)
    weight = torch.randn(64)
    with torch.inference_mode():
        assert rms_norm.normalize(x, weight, 1e-5) is None
        assert rms_norm.normalize(torch.randn(1, 2, 64), weight.as_subclass(Wrapped), 1e-5) is None


def test_a_new_build_replaces_the_stale_ones(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SORAI_HOME", str(tmp_path))
    folder = tmp_path / "kernels"
    folder.mkdir()
    stale = folder / "rms_norm-0123456789abcdef.so"
    stale.write_bytes(b"an older build")
    other = folder / "decode_attention-0123456789abcdef.so"
    other.write_bytes(b"another kernel's build")
    built = native.build(rms_norm.SOURCE)
    assert built.exists() and built.parent == folder
    assert not stale.exists() and other.exists()
    assert native.build(rms_norm.SOURCE) == built  # cached: the same file, not rebuilt
