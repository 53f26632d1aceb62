"""The low-bit decode path: fbgemm's float16 GEMM by default where this torch has it, else the
kernels (both batch- and thread-invariant); the kernels on every core or a float32 copy only
where a server opts in, computing the same products."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sorai.errors import SoraiError
from sorai.model.quant import Int4Linear, Int8Linear, decode_path, fp16_gemm
from sorai.model.quant.linear import ALL_CORES_FROM_ROWS, on_all_cores


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        Int4Linear.quantize(torch.randn(128, 64) / 8), Int8Linear.quantize(torch.randn(64, 128))
    )


@pytest.mark.parametrize("kind", [Int4Linear, Int8Linear])
def test_a_kernel_rows_numbers_depend_on_neither_its_batch_nor_the_threads(kind) -> None:
    """What lets a step of many rows run on every core and one row on fewer."""
    torch.manual_seed(1)
    layer = kind.quantize(torch.randn(1536, 576) / 24)
    x = torch.randn(16, 576).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [layer._lowbit(row[None]) for row in x]
        one_thread = layer._lowbit(x)
        torch.set_num_threads(2)
        two_threads = layer._lowbit(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, two_threads)
    assert all(torch.equal(two_threads[i : i + 1], alone[i]) for i in range(16))
    four = on_all_cores(layer._lowbit, x[:ALL_CORES_FROM_ROWS], ALL_CORES_FROM_ROWS)
    assert torch.equal(four, one_thread[:ALL_CORES_FROM_ROWS])
    assert torch.get_num_threads() == threads  # put back after the call


def test_fp16_where_it_is_here_and_fits_else_the_kernels(monkeypatch) -> None:
    model = _model()
    monkeypatch.delenv(decode_path.ENVIRONMENT, raising=False)
    path, why = decode_path.choose(model, 32)
    assert (path == "fp16") == fp16_gemm.supported()
    if path == "fp16":
        assert "MiB float16 copy" in why
    if path == "fp16":
        # Room for the copy in half the memory but not in an eighth: asked for, not by default.
        need = fp16_gemm.packed_bytes(128, 64) + fp16_gemm.packed_bytes(64, 128)
        monkeypatch.setattr(decode_path, "_available_bytes", lambda: 4 * need)
        path, why = decode_path.choose(model, 32)
        assert path == "kernel" and "more than 1/8 of" in why
        assert decode_path.choose(model, 32, "fp16")[0] == "fp16"
    monkeypatch.setattr(decode_path, "_available_bytes", lambda: 1000)  # a machine without room
    path, why = decode_path.choose(model, 32)
    assert path == "kernel"
    monkeypatch.setenv(decode_path.ENVIRONMENT, "fp16")
    path, why = decode_path.choose(model, 32)
    assert path == "kernel" and why.startswith("SORAI_LOWBIT_DECODE=fp16, but")
    monkeypatch.setattr(fp16_gemm, "supported", lambda: False)  # a torch without fbgemm
    monkeypatch.setattr(decode_path, "_available_bytes", lambda: 2**40)
    path, why = decode_path.choose(model, 32)
    assert path == "kernel" and "no batch-invariant fp16 GEMM" in why


def test_the_kernels_unless_a_server_opts_into_the_float32_copy(monkeypatch) -> None:
    model = _model()
    monkeypatch.setenv(decode_path.ENVIRONMENT, "kernel")
    assert decode_path.choose(model, 32)[0] == "kernel"
    monkeypatch.setenv(decode_path.ENVIRONMENT, "all-cores")
    assert decode_path.choose(model, 32)[0] == "all-cores"
    decode_path.use(model, "all-cores")
    assert model[0].all_cores_from_rows == ALL_CORES_FROM_ROWS and not model[0].dense_decode
    decode_path.use(model, "kernel")
    assert model[0].all_cores_from_rows is None
    monkeypatch.setenv(decode_path.ENVIRONMENT, "dense")
    path, why = decode_path.choose(model, 32)
    assert path == "dense" and "SORAI_LOWBIT_DECODE=dense" in why and "32 sequences" in why
    monkeypatch.setattr(decode_path, "_available_bytes", lambda: 1000)  # a machine without room
    assert decode_path.choose(model, 32)[0] == "kernel"
    monkeypatch.setenv(decode_path.ENVIRONMENT, "fast")
    with pytest.raises(SoraiError, match="'fast' is not a decode path; choose one of auto"):
        decode_path.choose(model, 32)


def test_the_float32_copy_computes_the_kernels_products() -> None:
    model = _model()
    x = torch.randn(1, 1, 64)  # one decoding token: the kernel's row
    with torch.inference_mode():
        kernel = model(x)
        decode_path.use(model, "dense")
        dense = model(x)
        assert model[0].dense_cache is not None  # made on first use
        assert "float32 decode copy" in model[0].weight_format
        # The same bf16-rounded products as the kernel, summed in another order.
        torch.testing.assert_close(dense, kernel, rtol=2e-2, atol=2e-2)
        first = model[0]
        rows = x.reshape(-1, 64).to(torch.bfloat16).float()
        exact = torch.nn.functional.linear(rows, first.kernel_weight()).to(torch.bfloat16)
        assert torch.equal(first(x).reshape(1, -1), exact.float())
        decode_path.use(model, "kernel")
        assert torch.equal(model(x), kernel) and model[0].dense_cache is None


def test_the_first_engine_settles_the_path_of_a_shared_model(monkeypatch) -> None:
    model = _model()
    monkeypatch.setenv(decode_path.ENVIRONMENT, "dense")
    assert decode_path.settle(model, 32)[0] == "dense"
    monkeypatch.delenv(decode_path.ENVIRONMENT)
    assert decode_path.settle(model, 4)[0] == "dense"  # a second engine over the same model
    assert model[1].dense_decode


def test_a_second_engine_keeps_the_path_on_every_running_layer(monkeypatch, default_gguf) -> None:
    """Seen failing: a second engine re-fused q/k/v and gate/up into new modules left on the
    kernels while the rest of the model ran the settled path."""
    from sorai.model.fusion import fuse_projections, fused
    from sorai.model.loader import load_model

    model, _ = load_model(default_gguf)
    monkeypatch.setenv(decode_path.ENVIRONMENT, "dense")
    for _ in range(2):  # what each LLMEngine.__init__ does
        fuse_projections(model)
        decode_path.settle(model, 4)
    attn = model.layers["0"].self_attn
    qkv = fused(attn, (attn.q_proj, attn.k_proj, attn.v_proj)).module
    assert qkv.dense_decode and attn.o_proj.dense_decode
