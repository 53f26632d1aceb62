"""Sentence embeddings: a BERT-style sentence-transformers directory in plain PyTorch.

The directory is what sentence-transformers saves: `modules.json` naming a Transformer (a BERT
`config.json`, `model.safetensors` with Hugging Face's names, `tokenizer.json`), a Pooling
module (`1_Pooling/config.json`) and optionally Normalize. `SentenceEncoder.from_dir` reads it;
`encode` turns texts into one float32 vector each, as `SentenceTransformer.encode` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import Tensor, nn

from sorai.errors import ModelFormatError
from sorai.model import hardware
from sorai.model.weights import safetensors_files

# sentence-transformers' pooling modes, in the order it concatenates them when several are on.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
# Batches when no batch size is given: texts of similar lengths (each row pads by under 1/8 of
# its batch's width), up to 32 sequences of 256 tokens (sentence-transformers' default batch)
# or as many padded tokens of shorter ones. Padding costs as much as real tokens, while a
# batch's own overhead is a few tokens' worth, so small batches of equal lengths win.
BATCH_TOKENS = 8192
MAX_PADDING = 0.125


def _read_json(path: Path) -> dict[str, Any] | list[Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{path.parent} has no {path.name}") from None
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: not readable JSON ({e})") from None


@dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT encoder; field names follow Hugging Face's config.json."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        raw = _read_json(path)
        if not isinstance(raw, dict):
            raise ModelFormatError(f"{path}: expected a JSON object")
        model_type = raw.get("model_type")
        if model_type != "bert":
            names = ", ".join(raw.get("architectures") or []) or "no architectures"
            raise ModelFormatError(
                f"{path}: model_type {model_type!r} ({names}) is not a BERT encoder; sentence "
                "embeddings support BERT-style sentence-transformers models (model_type 'bert')"
            )
        position = raw.get("position_embedding_type", "absolute")
        if position != "absolute":
            raise ModelFormatError(
                f"{path}: position_embedding_type {position!r} is not supported (only 'absolute')"
            )
        act = raw.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ModelFormatError(
                f"{path}: hidden_act {act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}"
            )
        fields = {}
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = raw.get(name, 2 if name == "type_vocab_size" else None)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelFormatError(f"{path}: {name} must be an integer >= 1, got {value!r}")
            fields[name] = value
        if fields["hidden_size"] % fields["num_attention_heads"]:
            raise ModelFormatError(
                f"{path}: hidden_size {fields['hidden_size']} is not a multiple of "
                f"num_attention_heads {fields['num_attention_heads']}"
            )
        eps = raw.get("layer_norm_eps", 1e-12)
        return cls(**fields, layer_norm_eps=float(eps), hidden_act=act)


@dataclass(frozen=True)
class Pooling:
    """sentence-transformers' Pooling module: token vectors -> one vector per sentence."""

    modes: tuple[str, ...] = ("mean",)

    @classmethod
    def from_file(cls, path: Path, hidden_size: int) -> Pooling:
        raw = _read_json(path)
        if not isinstance(raw, dict):
            raise ModelFormatError(f"{path}: expected a JSON object")
        mode = raw.get("pooling_mode")  # sentence-transformers >= 5.x
        if mode is None:
            modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if raw.get(key))
        else:
            modes = (mode,) if isinstance(mode, str) else tuple(mode)
        modes = modes or ("mean",)
        bad = [m for m in modes if m not in POOLING_MODES]
        if bad:
            raise ModelFormatError(
                f"{path}: pooling mode {bad[0]!r} is not supported; supported: "
                + ", ".join(POOLING_MODES)
            )
        width = raw.get("embedding_dimension", raw.get("word_embedding_dimension", hidden_size))
        if width != hidden_size:
            raise ModelFormatError(
                f"{path}: the pooling expects {width}-dimensional token vectors, "
                f"the model makes {hidden_size}"
            )
        return cls(modes)

    def __call__(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """hidden: [B, T, H] token vectors; mask: [B, T] bool, True on real (right-padded)
        tokens. Returns [B, H * len(modes)]."""
        hidden = hidden.float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        lengths = weights.sum(dim=1).clamp(min=1e-9)
        positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
        pooled = []
        for mode in self.modes:
            if mode == "cls":
                pooled.append(hidden[:, 0])
            elif mode == "max":
                pooled.append(hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1))
            elif mode == "mean":
                pooled.append((hidden * weights).sum(dim=1) / lengths)
            elif mode == "mean_sqrt_len_tokens":
                pooled.append((hidden * weights).sum(dim=1) / lengths.sqrt())
            elif mode == "weightedmean":
                w = weights * positions.view(1, -1, 1)
                pooled.append((hidden * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9))
            else:  # lasttoken
                last = mask.sum(dim=1).clamp(min=1) - 1
                pooled.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        return torch.cat(pooled, dim=-1)


@dataclass(frozen=True)
class SentenceEncoderConfig:
    """Everything a sentence-transformers directory says, read without its weights."""

    path: Path  # the directory
    transformer_dir: Path  # where config.json, the weights and the tokenizer are
    bert: BertConfig
    pooling: Pooling
    normalize: bool
    max_seq_length: int
    lowercase: bool  # sentence_bert_config.json's do_lower_case: lowercase texts first

    @property
    def dimension(self) -> int:
        return self.bert.hidden_size * len(self.pooling.modes)

    @classmethod
    def from_dir(cls, path: str | Path) -> SentenceEncoderConfig:
        """Check `path` is a sentence-transformers directory of a BERT model and read it.

        Raises ModelFormatError naming the first thing that is missing or not supported.
        """
        path = Path(path)
        if not path.is_dir():
            raise ModelFormatError(
                f"{path} is not a sentence-transformers model directory (not a directory)"
            )
        if not (path / "modules.json").exists():
            raise ModelFormatError(
                f"{path} is not a sentence-transformers model directory: it has no modules.json"
            )
        modules = _read_json(path / "modules.json")
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise ModelFormatError(f"{path / 'modules.json'}: expected a list of modules")
        kinds = [str(m.get("type", "")).rpartition(".")[2] for m in modules]
        supported = ["Transformer", "Pooling"]
        if kinds not in (supported, supported + ["Normalize"]):
            raise ModelFormatError(
                f"{path / 'modules.json'}: modules {' -> '.join(kinds) or '(none)'} are not "
                "supported; a sentence encoder here is Transformer -> Pooling [-> Normalize]"
            )
        transformer_dir = path / str(modules[0].get("path") or "")
        if not (transformer_dir / "config.json").exists():
            raise ModelFormatError(f"{transformer_dir} has no config.json (the BERT config)")
        bert = BertConfig.from_file(transformer_dir / "config.json")
        pooling = Pooling.from_file(
            path / str(modules[1].get("path") or "") / "config.json", bert.hidden_size
        )
        st_config: dict[str, Any] = {}
        if (transformer_dir / "sentence_bert_config.json").exists():
            raw = _read_json(transformer_dir / "sentence_bert_config.json")
            st_config = raw if isinstance(raw, dict) else {}
        max_len = st_config.get("max_seq_length")
        if max_len is None and (transformer_dir / "tokenizer_config.json").exists():
            # sentence-transformers then takes the tokenizer's limit.
            raw = _read_json(transformer_dir / "tokenizer_config.json")
            max_len = raw.get("model_max_length") if isinstance(raw, dict) else None
        if not isinstance(max_len, int) or max_len < 2:
            max_len = bert.max_position_embeddings
        if (
            not (transformer_dir / "tokenizer.json").exists()
            and not (transformer_dir / "vocab.txt").exists()
        ):
            raise ModelFormatError(f"{transformer_dir} has no tokenizer.json (nor a vocab.txt)")
        safetensors_files(transformer_dir)  # raises when there are no safetensors weights
        return cls(
            path=path,
            transformer_dir=transformer_dir,
            bert=bert,
            pooling=pooling,
            normalize=len(kinds) == 3,
            max_seq_length=min(max_len, bert.max_position_embeddings),
            lowercase=bool(st_config.get("do_lower_case", False)),
        )


class BertLayer(nn.Module):
    """Self-attention then a GELU MLP, each followed by residual + LayerNorm (post-norm).

    The Linear layers may hold a lower precision (bf16 on a CPU or GPU that multiplies it fast):
    their inputs are cast to it, and the residual stream and LayerNorms stay float32.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        # Query, key and value in one matmul: one weight read and one bias pass instead of three.
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.mlp_in = nn.Linear(h, config.intermediate_size)
        self.mlp_out = nn.Linear(config.intermediate_size, h)
        self.mlp_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        """x: [B, T, H] float32; attn_mask: [B, 1, 1, T] additive (0 or -inf) in the Linear
        layers' dtype, or None when no row is padded."""
        b, t, h = x.shape
        dtype = self.qkv.weight.dtype
        q, k, v = (
            self.qkv(x.to(dtype))
            .view(b, t, 3, self.num_heads, h // self.num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        attended = self.attn_out(attended.transpose(1, 2).reshape(b, t, h))
        x = self.attn_norm(x + attended.to(x.dtype))
        mlp = self.mlp_out(self.act(self.mlp_in(x.to(dtype))))
        return self.mlp_norm(x + mlp.to(x.dtype))


# Hugging Face's names for a layer's parts (after `encoder.layer.N.`) -> ours.
# query, key and value are joined into qkv (in this order) once all three are read.
_QKV_PARTS = ("query", "key", "value")
_HF_LAYER_NAMES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "mlp_in",
    "output.dense": "mlp_out",
    "output.LayerNorm": "mlp_norm",
}
# Parts of BERT checkpoints that sentence embeddings do not use.
_UNUSED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids")


def _our_name(hf_name: str) -> str | None:
    name = hf_name.removeprefix("bert.")
    if name.startswith(_UNUSED_PREFIXES):
        return None
    if name.startswith("embeddings."):
        return name.removeprefix("embeddings.").replace("LayerNorm", "embed_norm")
    if name.startswith("encoder.layer."):
        index, _, rest = name.removeprefix("encoder.layer.").partition(".")
        part, _, param = rest.rpartition(".")
        if part in _HF_LAYER_NAMES:
            return f"layers.{index}.{_HF_LAYER_NAMES[part]}.{param}"
    return name  # unknown: reported as unexpected by load_weights


class BertModel(nn.Module):
    """The BERT encoder: token + position + token-type embeddings, LayerNorm, N BertLayers."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.embed_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the layers' matmuls and attention run in."""
        return self.layers[0].qkv.weight.dtype

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        """Run the layers' matmuls and attention in `dtype`; the embeddings, the LayerNorms and
        the residual stream stay float32 (so rounding does not pile up across the layers)."""
        for layer in self.layers:
            for linear in (layer.qkv, layer.attn_out, layer.mlp_in, layer.mlp_out):
                linear.to(dtype)

    def forward(self, input_ids: Tensor, mask: Tensor | None) -> Tensor:
        """input_ids: [B, T]; mask: [B, T] bool, True on real tokens, or None when every token
        is real (no row is padded: attention then needs no mask). Returns [B, T, H] float32."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings.weight[0]  # one segment: token type 0 throughout
        )
        x = self.embed_norm(x)
        attn_mask = None
        if mask is not None:
            # Built once for all layers: every query attends to the real keys only.
            attn_mask = torch.zeros(mask.shape, dtype=self.compute_dtype, device=mask.device)
            attn_mask = attn_mask.masked_fill_(~mask, float("-inf"))[:, None, None, :]
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x

    def load_weights(self, transformer_dir: Path) -> None:
        """Fill the parameters from the directory's safetensors (Hugging Face BERT names),
        float32."""
        expected = {name: tuple(p.shape) for name, p in self.named_parameters()}
        h = self.config.hidden_size
        for i in range(len(self.layers)):
            for param, shape in (("weight", (h, h)), ("bias", (h,))):
                del expected[f"layers.{i}.qkv.{param}"]
                expected.update({f"layers.{i}.{part}.{param}": shape for part in _QKV_PARTS})
        state: dict[str, Tensor] = {}
        for file in safetensors_files(transformer_dir):
            try:
                tensors = load_file(file)
            except (SafetensorError, OSError) as e:
                raise ModelFormatError(f"{file}: unreadable safetensors file ({e})") from None
            for hf_name, tensor in tensors.items():
                name = _our_name(hf_name)
                if name is None:
                    continue
                if name not in expected:
                    raise ModelFormatError(f"{file}: unexpected weight {hf_name!r}")
                if tuple(tensor.shape) != expected[name]:
                    raise ModelFormatError(
                        f"{file}: weight {hf_name} has shape {tuple(tensor.shape)}, "
                        f"config.json says {expected[name]}"
                    )
                state[name] = tensor.float()
        missing = [name for name in expected if name not in state]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ModelFormatError(
                f"{transformer_dir}: missing weights {', '.join(missing[:3])}{more}"
            )
        for i in range(len(self.layers)):
            for param in ("weight", "bias"):
                parts = [state.pop(f"layers.{i}.{part}.{param}") for part in _QKV_PARTS]
                state[f"layers.{i}.qkv.{param}"] = torch.cat(parts)
        self.load_state_dict(state, assign=True)


def _load_tokenizer(config: SentenceEncoderConfig) -> Tokenizer:
    directory = config.transformer_dir
    if (directory / "tokenizer.json").exists():
        try:
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the Rust library raises plain Exceptions
            raise ModelFormatError(f"{directory / 'tokenizer.json'}: unreadable ({e})") from None
    else:
        # Older directories have only BERT's vocab.txt; build what transformers would.
        from tokenizers.implementations import BertWordPieceTokenizer

        options: dict[str, Any] = {}
        if (directory / "tokenizer_config.json").exists():
            raw = _read_json(directory / "tokenizer_config.json")
            options = raw if isinstance(raw, dict) else {}
        lowercase = bool(options.get("do_lower_case", True))
        tokenizer = BertWordPieceTokenizer(
            str(directory / "vocab.txt"),
            lowercase=lowercase,
            strip_accents=options.get("strip_accents"),
            handle_chinese_chars=bool(options.get("tokenize_chinese_chars", True)),
        )._tokenizer
    # The file's own padding and truncation (often fixed at 128) are not sentence-transformers'.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=config.max_seq_length)
    return tokenizer


def encoder_dtype(device: torch.device) -> torch.dtype:
    """The dtype the encoder's matmuls run fastest in on `device` (bf16 keeps MiniLM's vectors
    within 0.9999 cosine of float32 ones): bf16 on a GPU that has it (else fp16), bf16 on a CPU
    with AVX-512 BF16 or AMX, float32 on other CPUs (on AVX2 alone bf16 is several times
    slower than float32): the LLM's own `--dtype auto` choice (hardware.auto_dtype, which also
    says why)."""
    return hardware.auto_dtype(device)[0]


def length_batches(
    lengths: Sequence[int],
    batch_size: int | None = None,
    batch_tokens: int = BATCH_TOKENS,
    max_padding: float = MAX_PADDING,
) -> list[list[int]]:
    """Indices of `lengths` in batches of neighbours by length, longest first, each to be padded
    to its first (longest): batch_size sequences each, or (None) length buckets: a sequence
    joins the batch while its padding stays under `max_padding` of the batch's width and the
    batch within `batch_tokens` padded tokens (a batch holds at least one sequence)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1]
            width = lengths[batch[0]]
            if batch_size:
                fits = len(batch) < batch_size
            else:
                fits = (len(batch) + 1) * width <= batch_tokens and (
                    width - lengths[i] < max_padding * width
                )
            if fits:
                batch.append(i)
                continue
        batches.append([i])
    return batches


class SentenceEncoder:
    """A loaded sentence-transformers model: tokenizer -> BertModel -> pooling [-> normalize]."""

    def __init__(self, config: SentenceEncoderConfig, model: BertModel, tokenizer: Tokenizer):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> SentenceEncoder:
        """Load a sentence-transformers directory (eval mode, on `device`).

        device defaults to the GPU when there is one, else the CPU. dtype is the one the
        matmuls and attention run in ("float32", "bfloat16", "float16"); None picks the fastest
        for the device (encoder_dtype). A directory that is not a BERT-style
        sentence-transformers model raises ModelFormatError naming what is wrong.
        """
        from sorai.model.loader import resolve_device
        from sorai.model.weights import parse_dtype

        target = resolve_device(device)
        compute = encoder_dtype(target) if dtype is None else parse_dtype(dtype)
        config = SentenceEncoderConfig.from_dir(path)
        tokenizer = _load_tokenizer(config)
        with torch.device("meta"):
            model = BertModel(config.bert)
        model.load_weights(config.transformer_dir)
        model.set_compute_dtype(compute)
        model = model.to(target).eval().requires_grad_(False)
        return cls(config, model, tokenizer)

    @property
    def dimension(self) -> int:
        return self.config.dimension

    @property
    def max_seq_length(self) -> int:
        return self.config.max_seq_length

    @property
    def vocab_size(self) -> int:
        return self.config.bert.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the matmuls and attention run in."""
        return self.model.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.model.word_embeddings.weight.device

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text with [CLS] ... [SEP], cut to max_seq_length tokens."""
        if self.config.lowercase:
            texts = [text.lower() for text in texts]
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> Tensor:
        """One embedding per text: a float32 [len(texts), dimension] tensor on the CPU."""
        return self.encode_ids(self.tokenize(texts), batch_size)

    @torch.inference_mode()
    def encode_ids(
        self, token_ids: Sequence[Sequence[int]], batch_size: int | None = None
    ) -> Tensor:
        """Embeddings of sequences already tokenized (used as they are, cut to max_seq_length),
        in their order.

        The sequences run in batches of similar lengths (length_batches: batch_size sequences
        each, or by default length buckets), each padded only to its own longest; a batch with
        no padding runs attention without a mask.
        """
        sequences = [list(ids[: self.max_seq_length]) for ids in token_ids]
        if any(not ids for ids in sequences):
            raise ValueError("every sequence needs at least one token")
        lengths = [len(ids) for ids in sequences]
        out = torch.empty(len(sequences), self.dimension, dtype=torch.float32)
        for batch in length_batches(lengths, batch_size):
            rows = torch.tensor([lengths[i] for i in batch])
            width = lengths[batch[0]]
            mask = torch.arange(width) < rows[:, None]
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            ids[mask] = torch.tensor([t for i in batch for t in sequences[i]])
            ids, mask = ids.to(self.device), mask.to(self.device)
            padded = lengths[batch[-1]] < width
            hidden = self.model(ids, mask if padded else None)
            vectors = self.config.pooling(hidden, mask)
            if self.config.normalize:
                vectors = F.normalize(vectors, p=2, dim=-1)
            out[batch] = vectors.float().cpu()
        return out
