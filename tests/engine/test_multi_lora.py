"""LoRA adapters served unmerged: one batch mixes rows of several adapters and of the base.

The reference for an adapter is the adapter merged into a copy of the weights (or, for PEFT
parity, peft's own forward); the engine runs the base weights untouched, adding each row's
delta on the fly (sorai/model/multi_lora.py). Adapters are random, written in PEFT's format.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import sorai
from sorai.engine.adapters import AdapterNotFoundError
from sorai.engine.config import EngineConfig
from sorai.engine.llm import LLM
from sorai.engine.llm_engine import LLMEngine
from sorai.engine.params import SamplingParams
from sorai.model.lora import LoRAError, linear_shapes, load_adapter, merge_lora, read_adapter
from sorai.model.multi_lora import MultiLoRA
from sorai.model.weights import load_hf_dir
from tests.engine.lora_files import EIGHT, Spec, write_adapter
from tests.engine.oracle import oracle_tokens

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
GREEDY_OPTIONS = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
PROMPTS = [
    "The history of the city begins",
    "A recipe for bread:",
    "Three facts about the moon:",
    "def fibonacci(n):",
    "Dear customer, thank you for",
]


@pytest.fixture(scope="module")
def dense(default_gguf: Path) -> LLM:
    """The default model in float32 (a merged reference needs float weights); its weights are
    never changed here: references merge into copies."""
    return sorai.load(default_gguf, quantize="none")


def engine_for(llm: LLM, **config: object) -> LLMEngine:
    return LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=256, **config), name="b")


def run(
    engine: LLMEngine, jobs: list[tuple[list[int], str | None]], stagger: bool = False
) -> list[list[int]]:
    """Every job (prompt ids, adapter) as one request, all batched; their greedy tokens.

    stagger: one request joins per step, so each prompt is computed in a step of its own
    (with the others' decodes): a low-bit model's prompt rows run one dense GEMM per step,
    whose sums follow its row count, so only then are they bit for bit those of the request
    alone (sorai.model.quant.linear)."""
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(jobs))}

    def step() -> None:
        for out in engine.step():
            for choice in out.choices:
                tokens[out.request_id] += choice.token_ids

    for i, (ids, adapter) in enumerate(jobs):
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, adapter=adapter)
        engine.add_request(str(i), ids, params)
        if stagger:
            step()
    while engine.has_work():
        step()
    assert engine.pool.num_used == 0, "every KV block is free once the requests end"
    return [tokens[str(i)] for i in range(len(jobs))]


def merged_tokens(llm: LLM, adapter: Path | None, prompt: list[int]) -> list[int]:
    model = llm.model
    if adapter is not None:
        model = copy.deepcopy(model)
        load_adapter(model, adapter, dtype=torch.float32)
        merge_lora(model)
    return oracle_tokens(model, prompt, GREEDY)


@pytest.mark.slow
def test_eight_adapters_in_one_batch_match_each_merged_alone(dense: LLM, tmp_path: Path) -> None:
    paths = [write_adapter(tmp_path / f"a{i}", dense.model, s, seed=i) for i, s in enumerate(EIGHT)]
    engine = engine_for(dense, max_loras=8, max_lora_rank=16)
    for i, path in enumerate(paths):
        engine.adapters.add(f"a{i}", path)
    prompts = [dense.tokenizer.encode(p) for p in PROMPTS]
    # 8 adapter rows and 3 base rows, interleaved: generated tokens gather, prompt tokens
    # segment (sorai/model/multi_lora.py).
    jobs = [(prompts[i % len(prompts)], f"a{i}") for i in range(8)]
    jobs[2:2] = [(prompts[0], None)]
    jobs[6:6] = [(prompts[1], None)]
    jobs.append((prompts[2], None))
    got = run(engine, jobs)
    base = {tuple(p): merged_tokens(dense, None, p) for p in prompts[:3]}
    changed = 0
    for (prompt, name), tokens in zip(jobs, got, strict=True):
        if name is None:
            assert tokens == base[tuple(prompt)]
            continue
        expected = merged_tokens(dense, paths[int(name[1:])], prompt)
        assert tokens == expected, name
        changed += tokens != merged_tokens(dense, None, prompt)
    assert changed >= 6, "the adapters are strong enough to change most greedy answers"
    engine.adapters.lora.remove()


@pytest.mark.slow
def test_two_adapters_and_base_in_one_batch_match_merged(dense: LLM, tmp_path: Path) -> None:
    specs = (EIGHT[1], EIGHT[2])
    paths = [write_adapter(tmp_path / f"a{i}", dense.model, s, seed=i) for i, s in enumerate(specs)]
    engine = engine_for(dense)
    for i, path in enumerate(paths):
        engine.adapters.add(f"a{i}", path)
    prompt = dense.tokenizer.encode(PROMPTS[0])
    got = run(engine, [(prompt, "a0"), (prompt, None), (prompt, "a1")])
    assert got[1] == merged_tokens(dense, None, prompt)
    assert got[0] == merged_tokens(dense, paths[0], prompt) != got[1]
    assert got[2] == merged_tokens(dense, paths[1], prompt) != got[1]
    engine.adapters.lora.remove()


def test_quantized_base_runs_adapters_in_a_batch_as_alone(default_llm: LLM, tmp_path: Path) -> None:
    """int4 layers (the default GGUF) keep their fused low-bit matmuls; the delta goes on top.
    Each adapter's tokens in a mixed batch equal its tokens alone (merging into int4 is not a
    thing), and differ from the base's."""
    model = default_llm.model
    paths = [
        write_adapter(tmp_path / f"q{i}", model, s, seed=10 + i, std=0.3)
        for i, s in enumerate((EIGHT[4], EIGHT[0]))
    ]
    engine = engine_for(default_llm)
    for i, path in enumerate(paths):
        engine.adapters.add(f"q{i}", path)
    try:
        prompt = default_llm.tokenizer.encode(PROMPTS[2])
        mixed = run(engine, [(prompt, "q0"), (prompt, None), (prompt, "q1")], stagger=True)
        alone = [run(engine, [(prompt, name)])[0] for name in ("q0", None, "q1")]
        assert mixed == alone
        assert mixed[0] != mixed[1]
    finally:
        engine.adapters.lora.remove()


def test_peft_adapter_unmerged_gives_peft_logits(tmp_path: Path) -> None:
    from peft import LoraConfig

    from tests.model.reference import load_reference, peft_reference, write_hf_checkpoint

    checkpoint = write_hf_checkpoint(tmp_path / "tiny", "llama", tie_word_embeddings=False)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 4},
        alpha_pattern={"v_proj": 4},
        task_type="CAUSAL_LM",
    )
    reference = peft_reference(checkpoint, config)
    reference.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference.eval()(ids).logits[0]
        plain = load_reference(checkpoint)(ids).logits[0]

    model = load_hf_dir(checkpoint, torch.float32)
    lora = MultiLoRA(model, max_loras=3, max_rank=8)
    lora.load(2, read_adapter(tmp_path / "adapter", linear_shapes(model)))
    for gather in (False, True):
        with torch.inference_mode(), lora.rows([2] * ids.shape[1], gathered=gather):
            ours = model(ids)[0]
        assert (ours - expected).abs().max() < 1e-4
    assert (expected - plain).abs().max() > 1e-2  # the adapter matters


def test_prefix_cache_is_keyed_by_adapter(default_llm: LLM, tmp_path: Path) -> None:
    path = write_adapter(tmp_path / "a", default_llm.model, EIGHT[0], seed=0)
    engine = engine_for(default_llm)
    engine.adapters.add("a", path)
    prompt = default_llm.tokenizer.encode(" ".join(PROMPTS))  # several full blocks
    hits = []
    for adapter in (None, "a", "a", None):
        before = engine.stats().prefix_cache_hits
        run(engine, [(prompt, adapter)])
        hits.append(engine.stats().prefix_cache_hits - before)
    # The first run under the adapter finds nothing of the base's blocks; the second its own.
    assert hits[0] == 0 and hits[1] == 0 and hits[2] > 0 and hits[3] > 0
    engine.adapters.lora.remove()


def test_slots_evict_idle_adapters_and_running_requests_keep_theirs(
    default_llm: LLM, tmp_path: Path
) -> None:
    model = default_llm.model
    paths = [write_adapter(tmp_path / f"a{i}", model, s, seed=i) for i, s in enumerate(EIGHT[:3])]
    engine = engine_for(default_llm, max_loras=2)
    for i, path in enumerate(paths):
        engine.adapters.add(f"a{i}", path)
    prompt = default_llm.tokenizer.encode(PROMPTS[3])
    alone = {name: run(engine, [(prompt, name)])[0] for name in ("a0", "a1", "a2")}
    # Three adapters, two slots: the third request waits for a slot, then evicts the idle one.
    assert run(engine, [(prompt, "a0"), (prompt, "a1"), (prompt, "a2")]) == list(alone.values())
    assert len(engine.adapters.resident()) == 2
    # Removed while its request runs: the request finishes under it, new ones are refused.
    engine.add_request("running", prompt, SamplingParams(max_tokens=8, temperature=0, adapter="a0"))
    outputs = engine.step()
    engine.adapters.remove("a0")
    with pytest.raises(AdapterNotFoundError, match="'a0'"):
        engine.add_request("new", prompt, SamplingParams(adapter="a0"))
    while engine.has_work():
        outputs += engine.step()
    tokens = [t for out in outputs for c in out.choices for t in c.token_ids]
    assert tokens == alone["a0"][: len(tokens)] and tokens
    assert "a0" not in engine.adapters.resident() and engine.pool.num_used == 0
    engine.adapters.lora.remove()


def test_adapters_that_do_not_fit_are_refused_naming_why(default_llm: LLM, tmp_path: Path) -> None:
    engine = engine_for(default_llm, max_lora_rank=8)
    big = write_adapter(tmp_path / "big", default_llm.model, Spec(16, 16, ("q_proj",)), seed=0)
    with pytest.raises(LoRAError, match="rank 16 is above .*max_lora_rank 8"):
        engine.adapters.add("big", big)
    with pytest.raises(LoRAError, match="no such LoRA adapter directory"):
        engine.adapters.add("missing", tmp_path / "missing")
    with pytest.raises(LoRAError, match="adapter name 'a\\+b' is not usable"):
        engine.adapters.add("a+b", big)
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'nope'"):
        engine.check_request([1, 2], SamplingParams(adapter="nope"))


def test_python_api_runs_tools_logprobs_and_streams_under_an_adapter(
    default_llm: LLM, tmp_path: Path
) -> None:
    """llm.chat / generate / generate_stream take adapter=NAME; sorai.load(adapters=...) is
    this same LLM (LLM.from_model adds each with add_adapter), over the session's weights."""
    from tests.engine.test_tools import WEATHER

    path = write_adapter(tmp_path / "faq", default_llm.model, EIGHT[4], seed=10, std=0.3)
    llm = LLM(LLMEngine(default_llm.model, default_llm.tokenizer, EngineConfig(num_blocks=64)))
    llm.add_adapter("faq", path)
    try:
        assert llm.adapters == {"faq": path}
        ask = [{"role": "user", "content": "What is the weather in Paris?"}]
        call = llm.chat(
            ask, tools=[WEATHER], tool_choice="required", adapter="faq", max_tokens=40, seed=0
        )
        assert call.finish_reason == "tool_calls" and call.tool_calls
        assert call.tool_calls[0]["function"]["name"] == "get_weather"
        tuned = llm.generate(PROMPTS[2], adapter="faq", logprobs=2, **GREEDY_OPTIONS)
        assert len(tuned.logprobs) == len(tuned.token_ids)
        assert "".join(llm.generate_stream(PROMPTS[2], adapter="faq", **GREEDY_OPTIONS)) == (
            tuned.text
        )
        assert llm.generate(PROMPTS[2], **GREEDY_OPTIONS).text != tuned.text
        with pytest.raises(AdapterNotFoundError, match="'nope'"):
            llm.generate("hi", adapter="nope")
    finally:
        llm.engine.adapters.lora.remove()
    with pytest.raises(LoRAError, match="no such LoRA adapter directory"):
        sorai.load(default_llm.name, adapters={"x": tmp_path / "missing"})  # before loading


def test_a_gathered_row_is_the_same_whatever_shares_its_step(tmp_path: Path) -> None:
    """A generated token's delta, bit for bit, alone or beside rows of other adapters (other
    ranks), whichever way its batch reads the weights: a view of adjacent slots (with zero
    items between), a copy of scattered slots, one slot shared by every row, a copy per row."""
    from tests.model.reference import write_hf_checkpoint

    checkpoint = write_hf_checkpoint(tmp_path / "tiny", "llama", tie_word_embeddings=False)
    model = load_hf_dir(checkpoint, torch.float32)
    lora = MultiLoRA(model, max_loras=6, max_rank=16)
    for slot, spec in ((0, EIGHT[4]), (1, EIGHT[0]), (2, EIGHT[1]), (5, EIGHT[2])):  # r 12 4 16 8
        path = write_adapter(tmp_path / f"a{slot}", model, spec, seed=slot, std=0.3)
        lora.load(slot, read_adapter(path, linear_shapes(model)))
    generator = torch.Generator().manual_seed(0)

    def delta(target, slots: list[int], x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], sum(target.sizes))
        for batch in lora.plan(slots, gathered=True).batches:
            target._gather(batch, x, out)
        return out[slots.index(0)]

    cases = (
        [0, 0, 0],  # one slot, expanded
        [0, 1],  # adjacent slots, a view
        [1, 0, 2],  # unsorted
        [0, 2],  # a gap: a view with a zero item
        [5, 0],  # scattered: a copy
        [-1, 0, 0, 1, 1, 2, 2, 5],  # slots repeated: a copy per row
        [0, 1, 0, 1],  # a slot's rows apart
    )
    with torch.inference_mode():
        for target in lora.targets:
            x = torch.randn(9, target.in_features, generator=generator)
            for slots in cases:
                rows = x[: len(slots)].clone()
                rows[slots.index(0)] = x[8]
                alone = delta(target, [0], x[8:9])
                assert torch.equal(delta(target, slots, rows), alone), slots


def _tiny(tmp_path: Path):
    from tests.model.reference import write_hf_checkpoint

    return load_hf_dir(write_hf_checkpoint(tmp_path / "tiny", "llama"), torch.float32)


def test_a_byte_budget_fills_slots_and_evicts_idle_adapters_by_bytes(tmp_path: Path) -> None:
    from sorai.engine.adapters import AdapterRegistry

    model = _tiny(tmp_path)
    everything = Spec(8, 16, EIGHT[4].targets)  # all-linear, as `sorai train` makes
    paths = {
        "big1": write_adapter(tmp_path / "big1", model, everything, seed=1),
        "big2": write_adapter(tmp_path / "big2", model, everything, seed=2),
        "small": write_adapter(tmp_path / "small", model, Spec(4, 8, ("q_proj", "v_proj")), seed=3),
    }
    probe = AdapterRegistry(model, max_loras=4, max_lora_rank=8)
    big, small = (probe.slot_bytes(probe.read(paths[n])) for n in ("big1", "small"))
    assert big > small > 0
    registry = AdapterRegistry(model, max_loras=4, max_lora_rank=8, max_lora_bytes=big + small)
    with pytest.raises(LoRAError, match="above the adapter memory budget"):
        AdapterRegistry(model, 4, 8, max_lora_bytes=big - 1).add("big1", paths["big1"])
    entries = {}
    for name, path in paths.items():
        registry.add(name, path)
        entries[name] = registry.use(name)
    assert registry.admit(entries["big1"]) and registry.admit(entries["small"])
    # Both busy: big2's bytes do not fit and nothing is evicted; a free slot is not enough.
    assert not registry.admit(entries["big2"])
    registry.release(entries["small"], admitted=True)
    assert not registry.admit(entries["big2"]), "evicting the idle small one frees too little"
    assert registry.resident() == {"big1": 0, "small": 1}
    registry.release(entries["big1"], admitted=True)
    assert registry.admit(entries["big2"])  # the idle big1 goes, least recently used first
    assert registry.resident() == {"big2": 0, "small": 1}
    assert registry.resident_bytes() == big + small
    assert registry.lora.capacity == 2, "the stacks hold the slots used, not max_loras"
    registry.lora.remove()


def test_an_adapter_trained_on_another_base_model_is_refused_naming_both(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    from sorai.engine.adapters import AdapterRegistry

    model = _tiny(tmp_path)
    registry = AdapterRegistry(model, 2, 16, base_name="org/tiny")
    path = write_adapter(tmp_path / "a", model, EIGHT[0], seed=0)

    def trained_on(base: str) -> Path:
        config = json.loads((path / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base
        (path / "adapter_config.json").write_text(json.dumps(config))
        return path

    with pytest.raises(LoRAError, match="trained on 'org/other'.*serves 'org/tiny'"):
        registry.read(trained_on("org/other"))
    registry.read(trained_on("hf:org/tiny@main"))  # the same model named otherwise
    with caplog.at_level("WARNING", logger="sorai.engine"):
        registry.read(trained_on(str(tmp_path / "merged-copy")))  # a local path: shapes fit
    assert "a local path" in caplog.text and "org/tiny" in caplog.text
    # Served from a directory (sorai serve -m /models/tiny): its name says nothing of the
    # model either, so an adapter naming a Hub repository is served with a warning.
    caplog.clear()
    served_from_path = AdapterRegistry(model, 2, 16, base_name=str(tmp_path / "models" / "x"))
    with caplog.at_level("WARNING", logger="sorai.engine"):
        served_from_path.read(trained_on("org/other"))
    assert "a local path" in caplog.text and "org/other" in caplog.text
