"""`sorai quantize`: the written GGUF and low-bit safetensors hold exactly the layers sorai
quantizes in memory, the gguf package reads the GGUF back, and llama.cpp runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from sorai.model.config import ModelConfig
from sorai.model.gguf import permute_qk
from sorai.model.loader import load_model
from sorai.model.quant import Int4Linear, Int8Linear
from sorai.model.quant.export import quantize_model
from sorai.model.quant.lowbit_dir import is_lowbit_dir
from sorai.model.tokenizer import Tokenizer
from sorai.model.transformer import Transformer
from sorai.model.weights import save_hf_dir

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = ["the theme of the thesis", "Hello, world! 123", "日本語も"]


def _tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE of 256 bytes, three merges and three special tokens: a real tokenizer
    whose GGUF metadata reads back in milliseconds (a 49k vocabulary takes seconds)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return Tokenizer(
        backend,
        name="tiny",
        special_tokens={"eos_token": "<|im_end|>"},
        chat_templates={"default": TEMPLATE},
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random llama checkpoint (2 blocks, width 64, tied table of 320 rows) with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-dense")
    config = ModelConfig.from_hf_dict(
        {
            "model_type": "llama",
            "vocab_size": 320,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "tie_word_embeddings": True,
        }
    )
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.1)
    save_hf_dir(model, path)
    _tiny_tokenizer().save(path)
    return path


def _greedy(model: Transformer, ids: list[int], steps: int = 8) -> list[int]:
    ids = list(ids)
    with torch.inference_mode():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


def _assert_same_model(ours: Transformer, reference: Transformer) -> None:
    mine, theirs = ours.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(mine[name], tensor), name
    ids = torch.tensor([[5, 70, 300, 9, 260, 33, 1, 17]])
    with torch.inference_mode():  # each position's greedy next token
        assert torch.equal(ours(ids).argmax(-1), reference(ids).argmax(-1))


@pytest.mark.parametrize("to", ["int4", "int8"])
def test_quantize_writes_exactly_the_layers_sorai_quantizes_in_memory(
    tiny_dir: Path, tmp_path: Path, to: str
) -> None:
    import gguf

    in_memory, _ = load_model(tiny_dir, "float32", quantize=to)
    kind = Int4Linear if to == "int4" else Int8Linear
    assert isinstance(in_memory.layers["1"].mlp.down_proj, kind)

    written = quantize_model(tiny_dir, to, tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(written)  # the gguf package reads it back
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == ("Q4_1" if to == "int4" else "Q8_0")
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "default"
    from_gguf, tokenizer = load_model(written, "float32")
    _assert_same_model(from_gguf, in_memory)
    source = Tokenizer.from_dir(tiny_dir)
    assert [tokenizer.encode(t) for t in TEXTS] == [source.encode(t) for t in TEXTS]
    assert tokenizer.chat_template == TEMPLATE and tokenizer.eos_token == "<|im_end|>"

    directory = quantize_model(tiny_dir, to, tmp_path / "tiny-st")
    assert is_lowbit_dir(directory)
    assert (
        "sorai low-bit layout"
        in json.loads((directory / "config.json").read_text())["quantization_config"]["note"]
    )
    from_dir, _ = load_model(directory, "float32")  # codes straight into the layers
    _assert_same_model(from_dir, in_memory)
    # The low-bit directory is a source too, read as its float values and quantized again.
    again, _ = load_model(quantize_model(directory, to, tmp_path / "again.gguf"), "float32")
    layer, before = again.layers["0"].mlp.up_proj, in_memory.layers["0"].mlp.up_proj
    step = before.scale.max().item()
    assert (layer.dequantize() - before.dequantize()).abs().max().item() <= step
    dense, _ = load_model(directory, "float32", quantize="none")
    assert type(dense.layers["0"].mlp.up_proj) is torch.nn.Linear
    assert torch.equal(
        dense.layers["0"].mlp.up_proj.weight, in_memory.layers["0"].mlp.up_proj.dequantize()
    )


def test_q4_0_is_llama_cpps_own_quantization(tiny_dir: Path, tmp_path: Path) -> None:
    import gguf

    written = quantize_model(tiny_dir, "q4_0", tmp_path / "tiny-q4_0.gguf")
    reader = gguf.GGUFReader(written)
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    dense, _ = load_model(tiny_dir, "float32", quantize="none")
    weight = permute_qk(dense.layers["0"].self_attn.q_proj.weight.detach(), 4)  # llama.cpp rows
    expected = gguf.quants.quantize(weight.contiguous().numpy(), gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(np.asarray(q.data).reshape(expected.shape), expected)
    # The safetensors of the same target holds the layers that GGUF loads into.
    from_gguf, _ = load_model(written, "float32")
    from_dir, _ = load_model(quantize_model(tiny_dir, "q4_0", tmp_path / "st"), "float32")
    _assert_same_model(from_dir, from_gguf)


def test_quantize_names_the_accepted_targets(sorai_main, tiny_dir: Path, tmp_path: Path) -> None:
    result = sorai_main("quantize", str(tiny_dir), "--to", "int3", "-o", str(tmp_path / "x"))
    assert result.returncode != 0
    assert "--to 'int3' is not supported; choose one of int4, int8, q4_0, q4_1, q8_0" in (
        result.stderr
    )
    result = sorai_main("quantize", str(tiny_dir), "--to", "int4", "-o", str(tiny_dir))
    assert result.returncode != 0 and "is not an empty directory; name a new one" in result.stderr


# ---- the default model, and llama.cpp on the written files (slow) ---------------------------


def _llama_server() -> Path | None:
    """The benchmarks' llama.cpp build (benchmarks/llama_cpp_peer.py), where it is in its cache."""
    cache = Path(os.environ.get("SORAI_BENCH_CACHE", "~/.cache/sorai/bench")).expanduser()
    found = sorted(cache.glob("llama.cpp-*/build/bin/llama-server"))
    return found[-1] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _llama_cpp_answers(server: Path, gguf_path: Path, prompt: str) -> tuple[str, list[int]]:
    """(greedy completion of 16 tokens, the prompt's token ids) from llama-server on the file."""
    port = _free_port()
    command = [str(server), "-m", str(gguf_path), "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "-c", "512", "-t", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"llama-server exited: {process.stderr.read().decode()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "llama-server did not become healthy in 120 s"
            time.sleep(0.5)
        base = f"http://127.0.0.1:{port}"
        body = {"prompt": prompt, "n_predict": 16, "temperature": 0, "cache_prompt": False}
        text = _post(f"{base}/completion", body)["content"]
        tokens = _post(f"{base}/tokenize", {"content": prompt})["tokens"]
        return text, tokens
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_the_default_model_quantized_runs_in_sorai_and_in_llama_cpp(
    default_gguf: Path, tmp_path: Path
) -> None:
    in_memory, tokenizer = load_model(default_gguf, "float32", quantize="int8")
    written = quantize_model(default_gguf, "int8", tmp_path / "smollm2-int8.gguf")
    ours, _ = load_model(written, "float32")
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt)
    assert _greedy(ours, ids) == _greedy(in_memory, ids)
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    server = _llama_server()
    if server is None:
        pytest.skip(
            "no llama.cpp build in the benchmarks' cache (python benchmarks/llama_cpp_peer.py)"
        )
    text, tokens = _llama_cpp_answers(server, written, prompt)
    assert "Paris" in text
    assert tokens == ids


@pytest.mark.slow
def test_a_dense_checkpoint_becomes_a_gguf_llama_cpp_runs(
    default_gguf: Path, tmp_path: Path
) -> None:
    """Hyperparameters, tokenizer and Q/K row order written from a Hugging Face directory."""
    dense, tokenizer = load_model(default_gguf, "float32", quantize="none")
    save_hf_dir(dense, tmp_path / "dense")
    tokenizer.save(tmp_path / "dense")
    written = quantize_model(tmp_path / "dense", "q8_0", tmp_path / "smollm2-q8_0.gguf")
    from_gguf, from_gguf_tokenizer = load_model(written, "float32")
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt)
    assert from_gguf_tokenizer.encode(prompt) == ids
    assert from_gguf_tokenizer.chat_template == tokenizer.chat_template
    assert tokenizer.decode(_greedy(from_gguf, ids)[len(ids) :]).strip().startswith("Paris")
    server = _llama_server()
    if server is None:
        pytest.skip(
            "no llama.cpp build in the benchmarks' cache (python benchmarks/llama_cpp_peer.py)"
        )
    text, tokens = _llama_cpp_answers(server, written, prompt)
    assert "Paris" in text
    assert tokens == ids
