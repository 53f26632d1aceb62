"""ModelConfig: the shape of a Llama-family transformer, from HF config.json or GGUF metadata;
and whether a model argument names a chat model at all (read from JSON, before any load)."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sorai import hub
from sorai.errors import ModelFormatError

# Architectures that are the same network up to the options below.
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

# Encoder-only architectures (HF and GGUF spellings): what embedding models are built on.
ENCODER_ARCHITECTURES = frozenset(
    {
        "albert",
        "bert",
        "camembert",
        "deberta",
        "deberta-v2",
        "distilbert",
        "electra",
        "modernbert",
        "mpnet",
        "nomic-bert",
        "nomic_bert",
        "roberta",
        "xlm-roberta",
    }
)


_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)


@dataclass
class ModelConfig:
    """Everything the transformer needs to be built; field names follow HF's config.json."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False  # bias on q, k, v and o (Llama); Qwen2 has q, k, v bias always
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelFormatError(f"config {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 0:
            theta = self.rope_theta
            raise ModelFormatError(f"config rope_theta must be a number > 0, got {theta!r}")
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelFormatError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def context_length(self) -> int:
        """Positions the model can attend over exactly as trained.

        Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window) is not
        implemented; within the window it equals full attention, so the context stops there.
        """
        window = self.extra.get("sliding_window")
        if self.model_type == "qwen2" and not self.extra.get("use_sliding_window"):
            window = None
        if isinstance(window, int) and 0 < window < self.max_position_embeddings:
            return window
        return self.max_position_embeddings

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_proj_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type", "llama")
        if model_type not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            if model_type in ENCODER_ARCHITECTURES:
                raise ModelFormatError(
                    f"model_type {model_type!r} is an encoder, the architecture of an "
                    f"embedding model, not of a chat model; supported: {supported}"
                )
            raise ModelFormatError(
                f"model_type {model_type!r} is not supported; supported: {supported}"
            )
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"]
        missing = [key for key in required + ["num_attention_heads"] if key not in raw]
        if missing:
            raise ModelFormatError(f"config.json lacks {', '.join(missing)}")
        # Newer transformers keep theta and scaling together under rope_parameters.
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_theta = raw.get("rope_theta") or rope.get("rope_theta") or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        if rope_scaling is not None:
            rope_scaling.pop("rope_theta", None)
        names = {f for f in cls.__dataclass_fields__ if f not in ("extra", "rope_scaling")}
        kwargs = {key: raw[key] for key in names if raw.get(key) is not None}
        kwargs.setdefault("num_key_value_heads", raw["num_attention_heads"])
        kwargs["rope_theta"] = rope_theta
        kwargs["rope_scaling"] = rope_scaling
        kwargs["extra"] = {k: v for k, v in raw.items() if k not in names}
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelFormatError(f"{path.parent} has no config.json") from None
        except json.JSONDecodeError as e:
            raise ModelFormatError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
        return cls.from_hf_dict(raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json content that transformers reads back as the same model."""
        out = {k: v for k, v in asdict(self).items() if k not in ("extra",)}
        out = {**self.extra, **out}
        if self.rope_scaling is None:
            out.pop("rope_scaling")
        out.pop("rope_parameters", None)
        out["architectures"] = [SUPPORTED_ARCHITECTURES[self.model_type]]
        out.setdefault("hidden_act", "silu")
        return out


def check_chat_model(name_or_path: str | os.PathLike) -> None:
    """Fail before anything is pulled or loaded on a model argument that cannot be a chat model:
    an unknown name (naming the known ones close to it), or an embedding model, known by name
    or a sentence-transformers / encoder directory (ModelFormatError, saying how to serve it)."""
    text = hub.model_text(name_or_path)
    source = hub.KNOWN_MODELS.get(text)
    if source is not None:
        kind = source.kind
        architecture = (source.architecture or kind) if kind == hub.EMBEDDING else None
    else:
        # JSON only: this check imports no torch and loads no weights. A Hub model not
        # pulled yet is checked once it is there.
        path = hub.local_path(text)
        architecture = embedding_architecture(path) if path is not None else None
    if architecture is None:
        return
    raise ModelFormatError(
        f"{text!r} is an embedding model ({architecture}); chat, generate and serve --model "
        f"need a chat model such as {hub.DEFAULT_MODEL}; serve it with "
        f"`sorai serve --embedding-model {shlex.quote(text)}`"
    )


def embedding_architecture(path: Path) -> str | None:
    """The architecture (e.g. "bert") when `path` is an embedding model: a sentence-transformers
    directory (it has modules.json) or an HF directory of an encoder; None for anything else.
    Reads JSON only, so a wrong kind of model is told apart before torch or weights load."""
    path = Path(path)
    if not path.is_dir():
        return None
    model_type = _model_type(path / "config.json")
    if (path / "modules.json").exists():
        if model_type is None:  # the encoder's config.json may sit in its module's directory
            modules = _read_json(path / "modules.json")
            first = modules[0] if isinstance(modules, list) and modules else None
            inner = first.get("path") if isinstance(first, dict) else None
            model_type = _model_type(path / str(inner or "") / "config.json")
        return model_type or "sentence-transformers"
    return model_type if model_type in ENCODER_ARCHITECTURES else None


def _model_type(config_json: Path) -> str | None:
    raw = _read_json(config_json)
    value = raw.get("model_type") if isinstance(raw, dict) else None
    return str(value) if value else None


def _read_json(path: Path) -> Any:
    """The file's JSON, or None: a missing or malformed file is the loader's to report."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
