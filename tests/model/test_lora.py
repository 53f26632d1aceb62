"""LoRA: the math (B = 0 is a no-op, only A and B train), merging, and PEFT parity both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from sorai.errors import ModelFormatError
from sorai.model.loader import use_column_major_weights
from sorai.model.lora import (
    LoRAConfig,
    LoRAError,
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
    select_targets,
)
from sorai.model.transformer import Transformer
from sorai.model.weights import load_hf_dir, save_hf_dir

from .reference import load_reference, peft_reference, write_hf_checkpoint

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_hf_checkpoint(
        tmp_path_factory.mktemp("tiny"), "llama", tie_word_embeddings=False, attention_bias=True
    )


def tokens(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(seed))


def sorai_model(checkpoint: Path, column_major: bool = True) -> Transformer:
    """The checkpoint as sorai.load gives it on the CPU (float32, column-major Linears)."""
    model = load_hf_dir(checkpoint, torch.float32)
    if column_major:
        use_column_major_weights(model)
    return model


def randomise_b(model: Transformer, seed: int = 0, std: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            w = module.lora_B.weight
            w.copy_(torch.randn(w.shape, generator=generator) * std)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(ids)
    return getattr(out, "logits", out)


def test_zero_b_leaves_the_logits_exactly_unchanged(checkpoint: Path) -> None:
    model = sorai_model(checkpoint)
    before = logits(model, tokens())
    adapter = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    assert len(adapter.modules) == 7 * 3
    assert all(bool(m.lora_A.weight.abs().sum() > 0) for m in adapter.modules.values())
    assert torch.equal(logits(model, tokens()), before)


def test_only_adapter_parameters_train_and_get_gradients(checkpoint: Path) -> None:
    model = sorai_model(checkpoint)
    adapter = apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)
    assert trainable == {n for n, _ in adapter.named_parameters()}
    assert adapter.num_parameters() == 3 * 4 * (256 + 256) + 3 * 4 * (256 + 128)
    model.train()
    ids = tokens()
    loss = nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
    loss.backward()
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    # B starts at zero, so A's first gradient is zero too; B's is not.
    assert all(m.lora_B.weight.grad.abs().sum() > 0 for m in adapter.modules.values())
    torch.optim.SGD(adapter.parameters(), lr=1.0).step()
    model.eval()
    assert not torch.equal(logits(model, ids), logits(sorai_model(checkpoint), ids))


CONFIGS = {
    "q-v": LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-linear-rslora": LoRAConfig(r=8, alpha=4, target_modules="all-linear", use_rslora=True),
    "one-layer": LoRAConfig(r=2, alpha=16, target_modules=["layers.1.mlp.down_proj", "k_proj"]),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sorai_adapter_loads_in_peft_with_the_same_logits(
    checkpoint: Path, tmp_path: Path, name: str
) -> None:
    from peft import PeftModel

    model = sorai_model(checkpoint)
    base = logits(model, tokens())
    apply_lora(model, CONFIGS[name])
    randomise_b(model)
    ours = logits(model, tokens())
    assert (ours - base).abs().max() > 1e-2  # the adapter really matters
    save_adapter(model, tmp_path, base_model_name="tiny-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny-llama"

    reference = PeftModel.from_pretrained(load_reference(checkpoint), tmp_path).eval()
    peft_keys = {k.replace(".default", "") for k in reference.state_dict() if ".lora_" in k}
    assert peft_keys == set(adapter_state_dict(model))
    assert (logits(reference, tokens()) - ours).abs().max() < 1e-4


def test_peft_adapter_loads_into_sorai_with_the_same_logits(
    checkpoint: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig

    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"k_proj": 4},
        task_type="CAUSAL_LM",
    )
    reference = peft_reference(checkpoint, config)
    reference.save_pretrained(tmp_path)
    expected = logits(reference.eval(), tokens())

    model = sorai_model(checkpoint)
    adapter = load_adapter(model, tmp_path)
    assert len(adapter.modules) == 4 * 3
    down = adapter.modules["layers.0.mlp.down_proj"]
    assert (down.r, down.scaling) == (2, 8.0)
    assert adapter.modules["layers.2.self_attn.k_proj"].scaling == 1.0
    assert adapter.modules["layers.2.self_attn.q_proj"].scaling == 4.0
    assert (logits(model, tokens()) - expected).abs().max() < 1e-4

    # and back out: sorai's export of it loads in PEFT with the same logits
    save_adapter(model, tmp_path / "again")
    from peft import PeftModel

    again = PeftModel.from_pretrained(load_reference(checkpoint), tmp_path / "again").eval()
    assert (logits(again, tokens()) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("column_major", [True, False], ids=["column-major", "row-major"])
def test_merge_keeps_the_logits_and_exports_to_transformers(
    checkpoint: Path, tmp_path: Path, column_major: bool
) -> None:
    model = sorai_model(checkpoint, column_major)
    apply_lora(model, LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    randomise_b(model)
    q = model.layers["0"].self_attn.q_proj
    expected_weight = q.base_layer.weight.detach() + q.delta_weight()
    unmerged = logits(model, tokens())
    with pytest.raises(ModelFormatError, match="merge_lora"):
        save_hf_dir(model, tmp_path / "unmerged")

    merge_lora(model)
    assert not lora_modules(model)
    assert type(model.layers["0"].self_attn.q_proj) is nn.Linear
    weight = model.layers["0"].self_attn.q_proj.weight
    assert weight.is_contiguous() is not column_major  # the layout survives the merge
    assert torch.allclose(weight, expected_weight, atol=1e-6)
    assert (logits(model, tokens()) - unmerged).abs().max() < 1e-5
    assert not any(p.requires_grad for p in model.parameters())

    save_hf_dir(model, tmp_path / "merged")
    reference = load_reference(tmp_path / "merged")
    assert (logits(reference, tokens()) - unmerged).abs().max() < 1e-4
    assert torch.equal(
        logits(load_hf_dir(tmp_path / "merged", torch.float32), tokens()), logits(model, tokens())
    )


def test_merge_and_unmerge_in_place_for_serving(checkpoint: Path) -> None:
    model = sorai_model(checkpoint)
    base = model.layers["1"].mlp.up_proj.weight.detach().clone()
    adapter = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["up_proj"]))
    randomise_b(model)
    unmerged = logits(model, tokens())
    for module in adapter.modules.values():
        module.merge()
        module.merge()  # idempotent
    assert (logits(model, tokens()) - unmerged).abs().max() < 1e-5
    for module in adapter.modules.values():
        module.unmerge()
    assert torch.allclose(model.layers["1"].mlp.up_proj.base_layer.weight, base, atol=1e-6)
    assert (logits(model, tokens()) - unmerged).abs().max() < 1e-5


def test_float32_adapter_on_a_bfloat16_model(checkpoint: Path) -> None:
    model = load_hf_dir(checkpoint, torch.bfloat16)
    adapter = apply_lora(model, LoRAConfig(target_modules=["q_proj"]), dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    randomise_b(model)
    out = model(tokens())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter.parameters())


def test_target_module_selection(checkpoint: Path) -> None:
    model = sorai_model(checkpoint)
    assert select_targets(model, ["q_proj"]) == [f"layers.{i}.self_attn.q_proj" for i in range(3)]
    assert select_targets(model, ["self_attn.o_proj", "layers.2.mlp.up_proj"]) == [
        "layers.0.self_attn.o_proj",
        "layers.1.self_attn.o_proj",
        "layers.2.self_attn.o_proj",
        "layers.2.mlp.up_proj",
    ]
    everything = select_targets(model, "all-linear")
    assert len(everything) == 21 and {n.rsplit(".", 1)[1] for n in everything} == set(LINEARS)
    assert "lm_head" not in everything
    with pytest.raises(LoRAError, match=r"'wq' matches no Linear.*known: down_proj"):
        select_targets(model, ["wq"])
    with pytest.raises(LoRAError, match="'self_attn' is a Attention, not a Linear"):
        select_targets(model, ["self_attn"])

    apply_lora(model, LoRAConfig(target_modules=["v_proj"]))
    assert isinstance(model.layers["0"].self_attn.v_proj, LoRALinear)
    assert isinstance(model.layers["0"].self_attn.q_proj, nn.Linear)
    assert "layers.0.self_attn.v_proj.lora_A.weight" in dict(model.named_parameters())
    with pytest.raises(LoRAError, match="already has LoRA layers"):
        apply_lora(model, LoRAConfig())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "rank r must be a positive integer"),
        ({"r": 2.5}, "rank r must be a positive integer"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"alpha": "16"}, "alpha must be a number"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"target_modules": "q_proj"}, "a list of module names"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"target_modules": ["lm_head"]}, "'lm_head' is not supported"),
        ({"target_modules": ["q_proj", ""]}, "'' is not a module name"),
    ],
)
def test_config_errors_name_the_bad_value(kwargs: dict, message: str) -> None:
    with pytest.raises(LoRAError, match=message):
        LoRAConfig(**kwargs)


def test_load_adapter_rejects_what_it_cannot_apply(checkpoint: Path, tmp_path: Path) -> None:
    model = sorai_model(checkpoint)
    with pytest.raises(LoRAError, match="no adapter_config.json"):
        load_adapter(model, tmp_path)
    donor = sorai_model(checkpoint)
    apply_lora(donor, LoRAConfig(target_modules=["q_proj"]))
    save_adapter(donor, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LoRAError, match="use_dora=True is not supported"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    wider = write_hf_checkpoint(tmp_path / "wider", "llama", hidden_size=128)
    with pytest.raises(LoRAError, match="this model needs"):
        load_adapter(load_hf_dir(wider, torch.float32), tmp_path)
    with pytest.raises(LoRAError, match="no LoRA layers to save"):
        save_adapter(model, tmp_path / "none")


def test_default_model_adapter_matches_peft(default_gguf: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from sorai.model.loader import load_model

    model, _ = load_model(default_gguf, "float32", "cpu", quantize="none")  # column-major
    save_hf_dir(model, tmp_path / "base")
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(1))
    base = logits(model, ids)[0, -1]
    apply_lora(model, LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    randomise_b(model, std=0.02)
    ours = logits(model, ids)[0, -1]
    assert (ours - base).abs().max() > 1e-2
    save_adapter(model, tmp_path / "adapter", base_model_name="smollm2-135m-instruct")
    reference = load_reference(tmp_path / "base")
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    assert (logits(peft_model, ids)[0, -1] - ours).abs().max() < 1e-4
