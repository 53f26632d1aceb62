"""`sorai quantize`: a model's weights rewritten in low bits, as a GGUF that llama.cpp also runs
or as safetensors in sorai's own low-bit layout (sorai.model.quant.lowbit_dir).

Targets (`--to`), for the block projections (q/k/v/o, gate/up/down):
  int4  sorai's int4 layers (group 32, asymmetric): exactly what `--quantize int4` builds at
        load, stored as Q4_1 (whose blocks are that layout); Q4_0/Q4_1 blocks are kept as they
        are, Q4_K's groups are carried over (their two-level scales rounded to float16).
  int8  sorai's int8 layers (one scale per row), what `--quantize int8` builds, stored as a Q8_0
        whose blocks share their row's scale (so it loads back bit for bit).
  q4_0, q4_1, q8_0  llama.cpp's own formats, quantized as llama.cpp's reference quantizer does
        (the gguf package's); a tensor already of that type is copied as it is.
The token table (embedding and output head) goes to int8 rows (int4, int8) or Q8_0 (q4_*, q8_0):
4 bits would cost the logits too much, as at load. Norms, biases and other tensors are copied
(float32 from a dense checkpoint). Everything is encoded one tensor at a time from the source's
own values, never through a float32 copy of the whole model. The safetensors format holds the
same layers: those `--quantize int4|int8` builds, or those the q4_*/q8_0 GGUF loads into.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from sorai.errors import ModelFormatError
from sorai.model.config import ModelConfig
from sorai.model.gguf import GGUFFile, gguf_name, is_gguf, permute_qk
from sorai.model.quant.gguf_blocks import int4_groups, q4_1_bytes, q8_0_bytes, q8_0_rows
from sorai.model.quant.gguf_meta import copy_metadata, dense_metadata
from sorai.model.quant.linear import Int4Linear, quantize_rows_int8
from sorai.model.quant.load import fitting
from sorai.model.tokenizer import Tokenizer
from sorai.model.weights import read_hf_tensors

TARGETS = ("int4", "int8", "q4_0", "q4_1", "q8_0")
FORMATS = ("gguf", "safetensors")
_BLOCK_MATMUL = re.compile(
    r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$"
)
_TABLES = ("token_embd.weight", "output.weight")
# The GGML type each target writes its block projections in (general.file_type follows it).
_BLOCK_TYPE = {"int4": "Q4_1", "int8": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q8_0": "Q8_0"}
_FILE_TYPE = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q8_0": "MOSTLY_Q8_0"}


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the model being quantized, under its GGUF name and in GGUF's row order."""

    name: str
    shape: tuple[int, ...]  # torch order: [rows, columns] for a matrix
    qtype: str  # its GGML type name ("F32" for a dense checkpoint's tensors)
    raw: Callable[[], np.ndarray]  # its encoded bytes, one row per matrix row (a GGUF's)
    values: Callable[[], Tensor]  # float32


@dataclass(frozen=True)
class Encoded:
    qtype: str  # the GGML type written
    data: np.ndarray  # uint8 blocks [rows, bytes per row] (or bytes of a vector), or float32


def check_target(to: str, fmt: str) -> None:
    if to not in TARGETS:
        raise ModelFormatError(f"--to {to!r} is not supported; choose one of {', '.join(TARGETS)}")
    if fmt not in FORMATS:
        raise ModelFormatError(
            f"--format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}"
        )


def output_format(out: Path, fmt: str | None) -> str:
    """The format asked for, or the one `out` names (a .gguf file, else a directory)."""
    return fmt or ("gguf" if out.suffix == ".gguf" else "safetensors")


def quantize_model(
    source: Path,
    to: str,
    out: Path,
    fmt: str | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> Path:
    """Write `source` (a .gguf file or a Hugging Face directory) quantized `to` into `out`."""
    fmt = output_format(out, fmt)
    check_target(to, fmt)
    if fmt == "gguf":
        write_gguf(source, to, out, progress)
        return out
    from sorai.model.loader import load_model
    from sorai.model.quant.lowbit_dir import save_lowbit_dir

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # Old weight files left beside the new ones would be read as part of the model.
        raise ModelFormatError(f"{out} exists and is not an empty directory; name a new one")

    if to in ("int4", "int8"):  # exactly the layers --quantize builds at load
        model, _ = load_model(source, "float32", "cpu", quantize=to)
        save_lowbit_dir(model, source_tokenizer(source), out)
    else:  # llama.cpp's formats: the GGUF's own layers
        with tempfile.TemporaryDirectory(prefix="sorai-quantize-") as scratch:
            staged = Path(scratch) / "model.gguf"
            write_gguf(source, to, staged, progress)
            model, _ = load_model(staged, "float32", "cpu")
            save_lowbit_dir(model, source_tokenizer(source), out)
    progress(f"wrote {out}")
    return out


def source_tokenizer(source: Path) -> Tokenizer:
    if source.is_dir():
        return Tokenizer.from_dir(source)
    return Tokenizer.from_gguf_metadata(GGUFFile(source).metadata, name=source.stem)


def write_gguf(
    source: Path, to: str, out: Path, progress: Callable[[str], None] = lambda _: None
) -> None:
    import gguf

    check_target(to, "gguf")
    from sorai.model.quant.lowbit_dir import is_lowbit_dir

    if is_lowbit_dir(source):  # sorai's own layout: its float values, quantized again
        with tempfile.TemporaryDirectory(prefix="sorai-quantize-") as scratch:
            _dense_copy(source, Path(scratch))
            write_gguf(Path(scratch), to, out, progress)
        return
    block_type = _BLOCK_TYPE[to]
    if source.is_dir():
        config = ModelConfig.from_file(source / "config.json")
        tensors = dense_sources(source, config)
        architecture = config.model_type
    elif is_gguf(source):
        gguf_file = GGUFFile(source)
        tensors = gguf_sources(gguf_file)
        architecture = gguf_file.architecture
    else:
        raise ModelFormatError(
            f"{source}: not a model; expected a Hugging Face directory or a .gguf file"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, architecture, use_temp_file=True)
    if source.is_dir():
        dense_metadata(writer, config, Tokenizer.from_dir(source), name=source.name)
    else:
        copy_metadata(gguf.GGUFReader(source), writer)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPE[block_type])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    counts: dict[str, int] = {}
    for tensor in tensors:
        encoded = encode(tensor, to)
        counts[encoded.qtype] = counts.get(encoded.qtype, 0) + 1
        raw_type = getattr(gguf.GGMLQuantizationType, encoded.qtype)
        writer.add_tensor(tensor.name, encoded.data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    progress(f"wrote {out} ({kinds} tensors; {out.stat().st_size / 2**20:.1f} MiB)")


def _dense_copy(source: Path, target: Path) -> None:
    from sorai.model.loader import load_model
    from sorai.model.weights import save_hf_dir

    model, tokenizer = load_model(source, "float32", "cpu", quantize="none")
    save_hf_dir(model, target)
    tokenizer.save(target)


def gguf_sources(gguf_file: GGUFFile) -> Iterator[SourceTensor]:
    import gguf

    for info in gguf_file.tensor_infos:
        qtype = gguf.GGMLQuantizationType(info.qtype).name
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1

        def raw(info=info, rows=rows) -> np.ndarray:
            return np.asarray(gguf_file.raw(info)).reshape(rows, -1)

        yield SourceTensor(info.name, info.shape, qtype, raw, lambda i=info: gguf_file.as_float(i))


def dense_sources(path: Path, config: ModelConfig) -> Iterator[SourceTensor]:
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for ours, tensor in read_hf_tensors(path):
        name = gguf_name(ours)
        if name is None:
            raise ModelFormatError(f"{path}: weight {ours!r} has no GGUF name")
        values = tensor.float()
        part = name.split(".")[2] if name.startswith("blk.") else ""
        if config.model_type in ("llama", "mistral") and part in heads:
            values = permute_qk(values, heads[part])  # llama.cpp's rotary layout
        yield SourceTensor(
            name,
            tuple(values.shape),
            "F32",
            lambda v=values: v.numpy(),
            lambda v=values: v,
        )


def encode(tensor: SourceTensor, to: str) -> Encoded:
    """The tensor as the target writes it (the module docstring)."""
    if _BLOCK_MATMUL.match(tensor.name):
        role = "block"
    elif tensor.name in _TABLES:
        role = "table"
    else:
        return _as_is(tensor)
    rows, cols = tensor.shape
    if to in ("int4", "int8"):
        wanted = to if role == "block" else "int8"
        target = fitting(wanted, rows, cols)
        if target == "int4":
            return _int4(tensor)
        if target == "int8":
            return _int8_rows(tensor)
        return _as_is(tensor)
    qtype = _BLOCK_TYPE[to] if role == "block" else "Q8_0"
    if cols % 32:
        return _as_is(tensor)
    if tensor.qtype == qtype:
        return Encoded(qtype, tensor.raw())
    import gguf

    kind = getattr(gguf.GGMLQuantizationType, qtype)
    return Encoded(qtype, gguf.quants.quantize(tensor.values().numpy(), kind))


def _as_is(tensor: SourceTensor) -> Encoded:
    data = tensor.raw()
    if data.dtype == np.uint8 and data.ndim == 2 and len(tensor.shape) == 1:
        data = data.reshape(-1)  # a vector's bytes
    return Encoded(tensor.qtype, data)


def _int4(tensor: SourceTensor) -> Encoded:
    """int4 groups as Q4_1 blocks: Q4_0/Q4_1 as they are, Q4_K's groups, or quantized."""
    if tensor.qtype in ("Q4_0", "Q4_1"):
        return Encoded(tensor.qtype, tensor.raw())
    if tensor.qtype == "Q4_K":
        q, scale, minimum = int4_groups(tensor.raw().reshape(-1), "Q4_K", tensor.shape[0])
        return Encoded("Q4_1", q4_1_bytes(q, scale, minimum))
    layer = Int4Linear.quantize(tensor.values())
    return Encoded("Q4_1", q4_1_bytes(layer.codes(), layer.scale, layer.minimum))


def _int8_rows(tensor: SourceTensor) -> Encoded:
    """int8 rows as Q8_0 blocks sharing their row's scale: Q8_0 folded per row, or quantized."""
    if tensor.qtype == "Q8_0":
        q, scale = q8_0_rows(tensor.raw().reshape(-1), tensor.shape[0])
    else:
        q, scale = quantize_rows_int8(tensor.values())
    return Encoded("Q8_0", q8_0_bytes(q, scale))
