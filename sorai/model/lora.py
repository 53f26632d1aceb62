"""LoRA: h = W0·x + (alpha/r)·B·A·x on chosen Linear layers, W0 frozen, B zero at the start.

A `LoRALinear` wraps a block's nn.Linear in place (`layers.0.self_attn.q_proj` keeps its name;
the original layer moves to `.base_layer`) and holds `lora_A` (in -> r) and `lora_B` (r -> out)
as plain bias-free nn.Linear modules, so tensor-parallel plans can target them by name. The
same modules serve training (only A and B take gradients) and serving (`merge()` folds B·A into
the base weight). Adapters go in and out in PEFT's format: adapter_config.json plus
adapter_model.safetensors keyed `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sorai.errors import ModelFormatError
from sorai.model.quant.linear import LowBitLinear
from sorai.model.transformer import Transformer

ALL_LINEAR = "all-linear"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT wraps the transformers model (`base_model.model`), whose blocks live under `model.`.
PEFT_PREFIX = "base_model.model.model."


class LoRAError(ModelFormatError):
    """A LoRA configuration or adapter that cannot be used (bad values, unknown modules)."""


@dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how: rank r, scaling alpha/r (alpha/sqrt(r) with use_rslora).

    target_modules names Linear layers of the blocks as PEFT does: "q_proj" matches every
    `layers.N.self_attn.q_proj`, "self_attn.q_proj" or "layers.0.self_attn.q_proj" narrower
    ones; "all-linear" is every Linear in the blocks (never lm_head).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | Sequence[str] = ("q_proj", "v_proj")
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LoRAError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise LoRAError(f"LoRA alpha must be a number, got {self.alpha!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise LoRAError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, int | float)
            or not 0 <= self.dropout < 1
        ):
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != ALL_LINEAR:
                # A lone name is the common slip; PEFT would read it as a regex.
                raise LoRAError(
                    f"target_modules must be {ALL_LINEAR!r} or a list of module names "
                    f"(e.g. ['q_proj', 'v_proj']), got the string {targets!r}"
                )
            return
        targets = tuple(targets)
        if not targets:
            raise LoRAError("target_modules is empty; name at least one module or 'all-linear'")
        for name in targets:
            if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
                raise LoRAError(f"target_modules: {name!r} is not a module name")
            if name == "lm_head" or name.endswith("embed_tokens"):
                raise LoRAError(
                    f"target_modules: {name!r} is not supported; LoRA applies to the Linear "
                    "layers of the blocks (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                    "down_proj)"
                )
        object.__setattr__(self, "target_modules", targets)

    @property
    def scaling(self) -> float:
        return scaling(self.alpha, self.r, self.use_rslora)


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """base_layer(x) + lora_B(lora_A(dropout(x))) * scaling; the base layer stays frozen."""

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        weight = base_layer.weight
        kwargs = {"bias": False, "device": weight.device, "dtype": dtype or weight.dtype}
        self.base_layer = base_layer.requires_grad_(False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, r, **kwargs)
        self.lora_B = nn.Linear(r, base_layer.out_features, **kwargs)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = scaling(alpha, r, use_rslora)
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A as nn.Linear (and PEFT) initialise it, B zero: the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        a = self.lora_A.weight
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))
        if out._is_view():
            # A tensor-parallel base returns its shard as a view that autograd forbids
            # modifying in place.
            return torch.add(out, delta.to(out.dtype), alpha=self.scaling)
        # In place, scaled on the way: one temporary the size of the output instead of three
        # (the base output is not saved for backward, so autograd allows it).
        return out.add_(delta.to(out.dtype), alpha=self.scaling)

    def delta_weight(self) -> Tensor:
        """(B·A)·scaling, shaped like the base weight, in float32."""
        a, b = self.lora_A.weight.float(), self.lora_B.weight.float()
        return (b @ a) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (in place, keeping its memory layout)."""
        if not self.merged:
            weight = self.base_layer.weight
            weight.copy_(weight.float() + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take a merged adapter back out of the base weight (exact up to rounding)."""
        if self.merged:
            weight = self.base_layer.weight
            weight.copy_(weight.float() - self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


@dataclass
class Adapter:
    """The LoRA layers applied to a model, by module name (`layers.0.self_attn.q_proj`)."""

    config: LoRAConfig
    modules: dict[str, LoRALinear] = field(default_factory=dict)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, module in self.modules.items():
            yield f"{name}.lora_A.weight", module.lora_A.weight
            yield f"{name}.lora_B.weight", module.lora_B.weight

    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains."""
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_dict(self) -> dict[str, Tensor]:
        """The adapter's tensors under PEFT's names."""
        return {_peft_key(name): p.detach() for name, p in self.named_parameters()}


def _peft_key(name: str) -> str:
    return PEFT_PREFIX + name


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _block_linears(model: Transformer) -> dict[str, nn.Linear | LoRALinear]:
    """The blocks' Linear layers by name; an adapted one counts once, as its LoRALinear."""
    found: dict[str, nn.Linear | LoRALinear] = {}
    for name, module in model.layers.named_modules(prefix="layers"):
        if isinstance(module, nn.Linear | LoRALinear) and not any(
            name.startswith(f"{seen}.") for seen in found
        ):
            found[name] = module
    return found


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def select_targets(model: Transformer, target_modules: str | Sequence[str]) -> list[str]:
    """The block Linears (sorai names) that target_modules picks; every target must match."""
    linears = _block_linears(model)
    if target_modules == ALL_LINEAR:
        return list(linears)
    chosen = set()
    for target in target_modules:
        hits = [name for name in linears if _matches(name, target)]
        if not hits:
            others = [n for n, m in model.named_modules() if n and _matches(n, target)]
            if others:
                kind = type(model.get_submodule(others[0])).__name__
                raise LoRAError(f"target module {target!r} is a {kind}, not a Linear layer")
            known = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise LoRAError(
                f"target module {target!r} matches no Linear layer in the blocks; "
                f"known: {', '.join(known)}"
            )
        chosen.update(hits)
    return [name for name in linears if name in chosen]


def _wrap(
    model: Transformer,
    name: str,
    r: int,
    alpha: float,
    config: LoRAConfig,
    dtype: torch.dtype | None,
) -> LoRALinear:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    base = getattr(parent, child)
    module = LoRALinear(base, r, alpha, config.dropout, config.use_rslora, dtype)
    setattr(parent, child, module)
    return module


def _check_fresh(model: Transformer) -> None:
    if not isinstance(model, Transformer):
        raise LoRAError(f"LoRA applies to a sorai Transformer, got {type(model).__name__}")
    if lora_modules(model):
        raise LoRAError("this model already has LoRA layers; merge_lora() it first")


def apply_lora(model: Transformer, config: LoRAConfig, dtype: torch.dtype | None = None) -> Adapter:
    """Wrap the targeted Linears in LoRALinear, in place, and freeze everything but A and B.

    dtype: the adapter's dtype (default: each base weight's), e.g. float32 adapters on a
    bfloat16 model.
    """
    _check_fresh(model)
    targets = select_targets(model, config.target_modules)
    model.requires_grad_(False)
    adapter = Adapter(config)
    for name in targets:
        adapter.modules[name] = _wrap(model, name, config.r, config.alpha, config, dtype)
    return adapter


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight and put the plain Linears back (for export)."""
    for name, module in lora_modules(model).items():
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.base_layer)
    return model


def adapter_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The model's LoRA tensors under PEFT's key names."""
    state = {}
    for name, module in lora_modules(model).items():
        state[_peft_key(f"{name}.lora_A.weight")] = module.lora_A.weight.detach()
        state[_peft_key(f"{name}.lora_B.weight")] = module.lora_B.weight.detach()
    return state


def _hf_module(name: str) -> str:
    return f"model.{name}"


def save_adapter(model: Transformer, path: Path, base_model_name: str | None = None) -> None:
    """Write the model's adapter as PEFT does: adapter_config.json + adapter_model.safetensors.

    Rank, alpha and dropout come from the LoRA layers themselves; layers whose rank or alpha
    differ from the most common one are listed in rank_pattern / alpha_pattern, as PEFT does.
    """
    modules = lora_modules(model)
    if not modules:
        raise LoRAError("this model has no LoRA layers to save; use apply_lora or load_adapter")
    ranks = [m.r for m in modules.values()]
    alphas = [m.alpha for m in modules.values()]
    r, alpha = max(set(ranks), key=ranks.count), max(set(alphas), key=alphas.count)
    first = next(iter(modules.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in modules}),
        "rank_pattern": {_hf_module(n): m.r for n, m in modules.items() if m.r != r},
        "alpha_pattern": {_hf_module(n): m.alpha for n, m in modules.items() if m.alpha != alpha},
        "use_rslora": first.use_rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    if set(select_targets(model, config["target_modules"])) != set(modules):
        # Not every layer adapted alike (e.g. q_proj in layer 0 only): name each module.
        config["target_modules"] = [_hf_module(n) for n in modules]
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: t.contiguous() for k, t in adapter_state_dict(model).items()}
    save_file(state, path / WEIGHTS_FILE, metadata={"format": "pt"})


_UNSUPPORTED = {
    "use_dora": (False, None),
    "modules_to_save": (None, [], ()),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "layer_replication": (None,),
    "trainable_token_indices": (None,),
    "target_parameters": (None, []),
}
_KEY = re.compile(r"^(.*)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def _pattern_value(patterns: dict, hf_name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", hf_name):
            return value
    return default


def adapter_name(adapter: Path) -> str:
    """The name an adapter is served under: its directory's name, or for `<output_dir>/adapter`
    (what `sorai train` writes) output_dir's name."""
    path = Path(adapter).absolute()
    if path.name == "adapter" and path.parent.name:
        return path.parent.name
    return path.name


def check_adapter_dir(path: str | Path) -> Path:
    """The adapter directory's Path, or LoRAError if it is plainly not a PEFT adapter: missing,
    not a directory, no or unreadable config, no or unreadable weights file (header only, so
    this is cheap to call before loading a model)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise LoRAError(f"{path}: no such LoRA adapter directory")
    if not path.is_dir():
        raise LoRAError(
            f"{path}: a LoRA adapter is a directory (with {CONFIG_FILE} and {WEIGHTS_FILE}), "
            "not a file"
        )
    config = path / CONFIG_FILE
    if not config.is_file():
        raise LoRAError(f"{path}: not a PEFT adapter directory (no {CONFIG_FILE})")
    try:
        raw = json.loads(config.read_text())
    except (ValueError, OSError) as e:
        raise LoRAError(f"{config}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise LoRAError(f"{config}: an adapter config is a JSON object, not a {type(raw).__name__}")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise LoRAError(f"{path}: no {WEIGHTS_FILE} (adapter_model.bin is not read)")
    try:
        with safe_open(weights, framework="pt"):  # the header: a truncated or foreign file
            pass
    except (SafetensorError, OSError) as e:
        raise LoRAError(f"{weights}: unreadable safetensors file ({e})") from None
    return path


@dataclass(frozen=True)
class AdapterModule:
    """One adapted Linear as read from disk: A [r, in], B [out, r] and its scaling."""

    lora_A: Tensor
    lora_B: Tensor
    alpha: float

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]


@dataclass(frozen=True)
class AdapterFile:
    """A PEFT LoRA adapter directory read and checked against a model's block Linears."""

    path: Path
    config: LoRAConfig
    modules: dict[str, AdapterModule]  # by sorai module name, in model order

    @property
    def rank(self) -> int:
        return max(m.r for m in self.modules.values())

    def scaling(self, name: str) -> float:
        module = self.modules[name]
        return scaling(module.alpha, module.r, self.config.use_rslora)

    def num_bytes(self) -> int:
        return sum(
            m.lora_A.numel() * m.lora_A.element_size() + m.lora_B.numel() * m.lora_B.element_size()
            for m in self.modules.values()
        )


def read_adapter(path: str | Path, shapes: dict[str, tuple[int, int]]) -> AdapterFile:
    """Read a PEFT LoRA adapter directory (sorai's or one PEFT wrote) for a model whose block
    Linears have `shapes` ({sorai name: (in, out)}); LoRAError naming why it does not fit.

    The adapted layers come from the weights file's keys; rank and alpha per layer from its
    shapes and the config (incl. rank_pattern / alpha_pattern).
    """
    path = check_adapter_dir(path)
    raw = json.loads((path / CONFIG_FILE).read_text())
    if raw.get("peft_type") != "LORA":
        raise LoRAError(f"{path}: adapter type {raw.get('peft_type')!r} is not supported (LORA)")
    for key, allowed in _UNSUPPORTED.items():
        if raw.get(key) not in allowed:
            raise LoRAError(f"{path}: {key}={raw[key]!r} is not supported by sorai's LoRA")
    weights = path / WEIGHTS_FILE
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise LoRAError(f"{weights}: unreadable safetensors file ({e})") from None
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if not match or not match.group(1).startswith(PEFT_PREFIX):
            raise LoRAError(f"{weights}: unexpected tensor {key!r}")
        name = match.group(1).removeprefix(PEFT_PREFIX)
        pairs.setdefault(name, {})[match.group(2)] = tensor
    if not pairs:
        raise LoRAError(f"{weights}: holds no LoRA tensors")
    for name, pair in pairs.items():
        if name not in shapes:
            raise LoRAError(f"{weights}: {name!r} is not a Linear layer of this model's blocks")
        if set(pair) != {"lora_A", "lora_B"}:
            raise LoRAError(f"{weights}: {name} has {sorted(pair)}, needs lora_A and lora_B")
    alpha, use_rslora = raw.get("lora_alpha", 8), bool(raw.get("use_rslora", False))
    config = LoRAConfig(
        r=int(raw.get("r", 8)),
        alpha=alpha,
        dropout=float(raw.get("lora_dropout") or 0.0),
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in pairs}),
        use_rslora=use_rslora,
    )
    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    modules = {}
    for name, (in_features, out_features) in shapes.items():  # in model order
        if name not in pairs:
            continue
        a, b = pairs[name]["lora_A"], pairs[name]["lora_B"]
        r = a.shape[0]
        if a.shape != (r, in_features) or b.shape != (out_features, r):
            raise LoRAError(
                f"{weights}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"this model needs ({r}, {in_features}) and ({out_features}, {r})"
            )
        hf_name = _hf_module(name)
        if _pattern_value(rank_pattern, hf_name, r) != r:
            raise LoRAError(f"{weights}: {name} has rank {r}, the config's rank_pattern differs")
        modules[name] = AdapterModule(a, b, _pattern_value(alpha_pattern, hf_name, alpha))
    return AdapterFile(path, config, modules)


def linear_shapes(model: Transformer) -> dict[str, tuple[int, int]]:
    """{name: (in_features, out_features)} of the model's block Linears, in model order."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.layers.named_modules(prefix="layers"):
        if isinstance(module, nn.Linear | LowBitLinear | LoRALinear) and not any(
            name.startswith(f"{seen}.") for seen in shapes
        ):
            shapes[name] = (int(module.in_features), int(module.out_features))
    return shapes


def load_adapter(model: Transformer, path: Path, dtype: torch.dtype | None = None) -> Adapter:
    """Apply a PEFT LoRA adapter directory (sorai's or one PEFT wrote) to the model, in place
    (see read_adapter)."""
    _check_fresh(model)
    file = read_adapter(path, linear_shapes(model))
    adapter = Adapter(file.config)
    model.requires_grad_(False)
    for name, read in file.modules.items():
        module = _wrap(model, name, read.r, read.alpha, file.config, dtype)
        with torch.no_grad():
            module.lora_A.weight.copy_(read.lora_A)
            module.lora_B.weight.copy_(read.lora_B)
        adapter.modules[name] = module
    return adapter
