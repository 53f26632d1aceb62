"""Request parameters, the sampler and stop strings (sorai.engine.params, sampler, stop)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sorai.engine.params import SamplingParams
from sorai.engine.sampler import SequenceState, process_logits, sample
from sorai.engine.stop import StopStringMatcher
from sorai.errors import SamplingError

VOCAB = 64
# Probabilities of a hand-made 5-token distribution, used by the mask tests.
HAND_PROBS = [0.05, 0.10, 0.15, 0.30, 0.40]


def state(params: SamplingParams, prompt=(), vocab: int = VOCAB, **kw) -> SequenceState:
    return SequenceState(params, list(prompt), vocab, **kw)


def hand_logits() -> torch.Tensor:
    return torch.tensor([HAND_PROBS]).log()


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def random_logits(rows: int = 1, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


# --- SamplingParams validation ---------------------------------------------------------------


def test_temperature_outside_openai_range_is_rejected_with_range():
    with pytest.raises(SamplingError, match=r"temperature must be in \[0, 2\], got -1\.0"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(SamplingError, match=r"temperature must be in \[0, 2\], got 2\.5"):
        SamplingParams(temperature=2.5)
    assert SamplingParams(temperature=2).temperature == 2.0


def test_top_p_above_one_is_rejected_with_range():
    with pytest.raises(SamplingError, match=r"top_p must be in \[0, 1\], got 1\.5"):
        SamplingParams(top_p=1.5)


def test_top_p_zero_keeps_only_the_most_likely_token():
    # OpenAI accepts top_p 0; the sampler always keeps the top token, so it is argmax.
    out = process_logits(hand_logits(), [state(SamplingParams(top_p=0), vocab=5)])
    assert kept(out) == {4}


def test_negative_top_k_is_rejected_with_range():
    with pytest.raises(SamplingError, match=r"top_k must be an integer >= 0 .*got -1"):
        SamplingParams(top_k=-1)


def test_nan_temperature_is_rejected():
    with pytest.raises(SamplingError, match=r"temperature must be a finite number, got nan"):
        SamplingParams(temperature=float("nan"))


def test_nan_top_p_is_rejected():
    with pytest.raises(SamplingError, match=r"top_p must be a finite number, got nan"):
        SamplingParams(top_p=float("nan"))


def test_max_tokens_below_one_is_rejected():
    with pytest.raises(SamplingError, match=r"max_tokens must be an integer >= 1, got 0"):
        SamplingParams(max_tokens=0)


def test_min_p_above_one_is_rejected():
    with pytest.raises(SamplingError, match=r"min_p must be in \[0, 1\], got 1\.1"):
        SamplingParams(min_p=1.1)


def test_zero_repetition_penalty_is_rejected():
    with pytest.raises(SamplingError, match=r"repetition_penalty must be > 0, got 0\.0"):
        SamplingParams(repetition_penalty=0)


def test_presence_penalty_out_of_range_is_rejected():
    with pytest.raises(SamplingError, match=r"presence_penalty must be in \[-2, 2\], got 2\.5"):
        SamplingParams(presence_penalty=2.5)


def test_frequency_penalty_out_of_range_is_rejected():
    with pytest.raises(SamplingError, match=r"frequency_penalty must be in \[-2, 2\], got -3\.0"):
        SamplingParams(frequency_penalty=-3)


def test_empty_stop_string_is_rejected():
    with pytest.raises(SamplingError, match=r"stop strings must be non-empty strings, got ''"):
        SamplingParams(stop=["ok", ""])


def test_string_temperature_is_rejected():
    with pytest.raises(SamplingError, match=r"temperature must be a number, got str '0\.7'"):
        SamplingParams(temperature="0.7")


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(SamplingError, match=r"min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_sampling_error_is_a_value_error():
    with pytest.raises(ValueError):
        SamplingParams(top_k=-5)


def test_stop_string_is_normalised_to_tuple():
    assert SamplingParams(stop="\n\nUser").stop == ("\n\nUser",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_integer_temperature_is_stored_as_float():
    params = SamplingParams(temperature=1)
    assert params.temperature == 1.0
    assert isinstance(params.temperature, float)


def test_greedy_property_follows_temperature():
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=0.7).greedy


def test_from_options_rejects_unknown_key_listing_valid_ones():
    with pytest.raises(SamplingError) as info:
        SamplingParams.from_options({"temprature": 0.5})
    message = str(info.value)
    assert "'temprature'" in message
    assert "valid options are: max_tokens, temperature, top_p, top_k" in message


def test_from_options_builds_params_and_treats_none_as_default():
    params = SamplingParams.from_options({"temperature": 0.5, "top_p": None, "stop": "END"})
    assert params == SamplingParams(temperature=0.5, stop=("END",))


# --- logits processing -------------------------------------------------------------------------


def test_greedy_takes_argmax():
    logits = random_logits(rows=3)
    params = SamplingParams(temperature=0)
    states = [state(params) for _ in range(3)]
    tokens = sample(process_logits(logits, states), states)
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()


def test_top_k_one_equals_greedy():
    logits = random_logits(rows=4, seed=1)
    states = [state(SamplingParams(top_k=1, seed=i)) for i in range(4)]
    tokens = sample(process_logits(logits, states), states)
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()


def test_process_logits_leaves_input_untouched():
    logits = random_logits()
    before = logits.clone()
    process_logits(logits, [state(SamplingParams(temperature=0.5, top_k=3))])
    assert torch.equal(logits, before)


def test_plain_greedy_rows_are_not_copied():
    # Nothing to change: the decode step's [B, V] logits go to argmax as they are.
    logits = random_logits(rows=3)
    states = [state(SamplingParams(temperature=0)) for _ in range(3)]
    assert process_logits(logits, states) is logits
    bias = [state(SamplingParams(temperature=0, logit_bias={1: 5.0}))]
    assert process_logits(logits[:1], bias) is not logits


def test_process_logits_returns_float32_for_half_input():
    out = process_logits(random_logits().half(), [state(SamplingParams(top_p=0.9))])
    assert out.dtype == torch.float32


def test_top_k_keeps_the_k_most_likely_tokens():
    out = process_logits(hand_logits(), [state(SamplingParams(top_k=2), vocab=5)])
    assert kept(out) == {3, 4}


def test_top_p_keeps_smallest_set_reaching_p():
    # Ascending cumulative: .05 .15 .30 .60 1.0; those <= 1 - 0.8 = 0.2 go.
    out = process_logits(hand_logits(), [state(SamplingParams(top_p=0.8), vocab=5)])
    assert kept(out) == {2, 3, 4}


def test_top_p_always_keeps_the_top_token():
    out = process_logits(hand_logits(), [state(SamplingParams(top_p=0.01), vocab=5)])
    assert kept(out) == {4}


def test_min_p_keeps_tokens_above_fraction_of_top_probability():
    # 0.3 * 0.40 = 0.12: 0.15, 0.30, 0.40 survive.
    out = process_logits(hand_logits(), [state(SamplingParams(min_p=0.3), vocab=5)])
    assert kept(out) == {2, 3, 4}


def test_top_k_then_top_p_applies_top_p_to_renormalised_top_k():
    # top_k=3 leaves .15 .30 .40 (renormalised .176 .353 .471); top_p=0.6 drops the .176.
    out = process_logits(hand_logits(), [state(SamplingParams(top_k=3, top_p=0.6), vocab=5)])
    assert kept(out) == {3, 4}


def test_surviving_probabilities_are_renormalised():
    out = process_logits(hand_logits(), [state(SamplingParams(top_k=2), vocab=5)])
    probs = out.softmax(dim=-1)[0]
    assert probs[3].item() == pytest.approx(0.3 / 0.7, abs=1e-6)
    assert probs[4].item() == pytest.approx(0.4 / 0.7, abs=1e-6)


def test_repetition_penalty_matches_transformers():
    logits = random_logits(vocab=200, seed=2)
    history = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(3))
    st = state(SamplingParams(repetition_penalty=1.3), prompt=history[0, :25].tolist(), vocab=200)
    for token in history[0, 25:].tolist():
        st.append(token)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    torch.testing.assert_close(process_logits(logits, [st]), expected, rtol=0, atol=0)


def test_repetition_penalty_accepts_tensor_appends():
    logits = random_logits(seed=4)
    params = SamplingParams(repetition_penalty=1.5)
    by_int, by_tensor = state(params, prompt=[1, 2]), state(params, prompt=[1, 2])
    by_int.append(7)
    by_tensor.append(torch.tensor([7]))
    assert torch.equal(process_logits(logits, [by_int]), process_logits(logits, [by_tensor]))


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p"),
    [
        (0.7, 0, 1.0, 0.0),
        (1.3, 20, 1.0, 0.0),
        (0.8, 0, 0.9, 0.0),
        (1.0, 0, 1.0, 0.05),
        (0.6, 40, 0.85, 0.02),
    ],
)
def test_warpers_match_transformers(temperature, top_k, top_p, min_p):
    logits = random_logits(rows=1, vocab=1000, seed=5)
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    if min_p:
        expected = MinPLogitsWarper(min_p)(None, expected)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    out = process_logits(logits, [state(params, vocab=1000)])
    assert torch.equal(torch.isfinite(out), torch.isfinite(expected))
    torch.testing.assert_close(out.softmax(-1), expected.softmax(-1), rtol=0, atol=1e-6)


def test_presence_and_frequency_penalties_subtract_from_generated_tokens():
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    st = state(params, prompt=[1], vocab=4)  # the prompt does not count (OpenAI semantics)
    for token in (2, 2, 3):
        st.append(token)
    out = process_logits(torch.zeros(1, 4), [st])
    assert out[0].tolist() == [0.0, 0.0, -(0.5 + 2 * 0.25), -(0.5 + 0.25)]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    params = SamplingParams(min_tokens=2, stop_token_ids=(5,))
    st = state(params, vocab=8, eos_token_ids=[7])
    logits = torch.zeros(1, 8)
    assert kept(process_logits(logits, [st])) == {0, 1, 2, 3, 4, 6}
    st.append(0)
    st.append(1)
    assert kept(process_logits(logits, [st])) == set(range(8))


def test_min_tokens_with_ignore_eos_leaves_eos_unmasked():
    st = state(SamplingParams(min_tokens=2, ignore_eos=True), vocab=8, eos_token_ids=[7])
    assert kept(process_logits(torch.zeros(1, 8), [st])) == set(range(8))
    assert st.stop_token_ids == frozenset()


def test_stop_token_ids_include_eos_and_params():
    st = state(SamplingParams(stop_token_ids=[3, 4]), eos_token_ids=[2])
    assert st.stop_token_ids == frozenset({2, 3, 4})


def test_batched_rows_are_processed_independently():
    logits = random_logits(rows=4, vocab=500, seed=6)
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.2),
        SamplingParams(temperature=0.7, top_k=10),
        SamplingParams(temperature=1.2, top_p=0.8, frequency_penalty=0.5),
        SamplingParams(min_p=0.1, presence_penalty=-1.0, repetition_penalty=0.9),
    ]

    def make(i: int) -> SequenceState:
        st = state(params[i], prompt=[i, i + 1, 40], vocab=500)
        for token in (i + 2, 40, 41):
            st.append(token)
        return st

    batch = process_logits(logits, [make(i) for i in range(4)])
    for i in range(4):
        alone = process_logits(logits[i : i + 1], [make(i)])
        assert torch.equal(torch.isfinite(batch[i]), torch.isfinite(alone[0]))
        torch.testing.assert_close(batch[i], alone[0])


def test_batched_seeded_samples_match_sampling_each_row_alone():
    logits = random_logits(rows=3, vocab=500, seed=7)
    params = [SamplingParams(seed=1), SamplingParams(temperature=0), SamplingParams(seed=2)]
    states = [state(p, vocab=500) for p in params]
    batch = [sample(process_logits(logits, states), states).tolist() for _ in range(5)]
    alone = []
    for i, p in enumerate(params):
        st = [state(p, vocab=500)]
        alone.append([sample(process_logits(logits[i : i + 1], st), st).item() for _ in range(5)])
    assert [list(row) for row in zip(*batch, strict=True)] == alone


def test_process_logits_rejects_mismatched_batch():
    with pytest.raises(ValueError, match=r"B == len\(states\) \(1\), got shape \(2, 64\)"):
        process_logits(random_logits(rows=2), [state(SamplingParams())])


# --- sampling ----------------------------------------------------------------------------------


def draw(seed: int | None, steps: int, logits: torch.Tensor) -> list[int]:
    st = [state(SamplingParams(seed=seed), vocab=logits.shape[-1])]
    processed = process_logits(logits, st)
    return [sample(processed, st).item() for _ in range(steps)]


def test_same_seed_gives_same_tokens():
    logits = torch.zeros(1, 100)
    assert draw(123, 20, logits) == draw(123, 20, logits)


def test_different_seeds_give_different_tokens():
    logits = torch.zeros(1, 100)
    assert draw(1, 20, logits) != draw(2, 20, logits)


def test_sample_frequencies_follow_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 8000
    tokens = torch.tensor(draw(0, n, probs.log().unsqueeze(0)))
    observed = torch.bincount(tokens, minlength=4).double()
    expected = probs.double() * n
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    # 3 degrees of freedom: P(chi2 > 16.27) = 0.001; the seed is fixed, so this is not flaky.
    assert chi2 < 16.27


def test_sampling_never_picks_a_masked_token():
    st = [state(SamplingParams(top_k=3, seed=9), vocab=1000)]
    logits = random_logits(vocab=1000, seed=8)
    allowed = set(logits[0].topk(3).indices.tolist())
    processed = process_logits(logits, st)
    assert {sample(processed, st).item() for _ in range(200)} <= allowed


def test_sample_returns_int64_per_row():
    states = [state(SamplingParams(seed=0)), state(SamplingParams(temperature=0))]
    tokens = sample(process_logits(random_logits(rows=2), states), states)
    assert tokens.dtype == torch.int64
    assert tokens.shape == (2,)


def test_tiny_temperature_is_greedy_without_nan():
    params = SamplingParams(temperature=1e-9)
    logits = random_logits(rows=2, seed=10) * 1e3
    states = [state(params), state(params)]
    out = process_logits(logits, states)
    assert not math.isnan(out.sum().item())
    assert sample(out, states).tolist() == logits.argmax(dim=-1).tolist()


# --- stop strings ------------------------------------------------------------------------------


def test_stop_string_split_across_pieces_is_cut_out():
    matcher = StopStringMatcher(["\n\nUser"])
    assert matcher.feed("Par") == ("Par", False)
    assert matcher.feed("is\n\nUser") == ("is", True)
    assert matcher.matched == "\n\nUser"


def test_stop_string_spanning_three_pieces_emits_text_before_it():
    matcher = StopStringMatcher("\n\nUser")
    emitted = [matcher.feed(p) for p in ("Paris", "\n", "\nUs", "er: hi")]
    assert "".join(text for text, _ in emitted) == "Paris"
    assert emitted[-1][1] is True


def test_partial_prefix_is_held_back_until_resolved():
    matcher = StopStringMatcher(["\n\nUser"])
    assert matcher.feed("Paris\n\nUs") == ("Paris", False)
    assert matcher.feed("a is big") == ("\n\nUsa is big", False)


def test_held_back_tail_is_returned_by_flush():
    matcher = StopStringMatcher(["###"])
    assert matcher.feed("done #") == ("done ", False)
    assert matcher.flush() == "#"
    assert matcher.flush() == ""


def test_earliest_of_multiple_stop_strings_wins():
    matcher = StopStringMatcher(["world", "lo w"])
    assert matcher.feed("hello world") == ("hel", True)
    assert matcher.matched == "lo w"


def test_feed_after_stop_emits_nothing():
    matcher = StopStringMatcher(["STOP"])
    matcher.feed("a STOP b")
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_matcher_without_stop_strings_passes_text_through():
    matcher = StopStringMatcher(())
    assert matcher.feed("anything\n\n") == ("anything\n\n", False)
    assert matcher.flush() == ""
