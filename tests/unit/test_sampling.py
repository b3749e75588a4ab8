"""The sampler as a user sees it: SamplingParams' checks, greedy, temperature, top-k and top-p (compared with
transformers' logits warpers), the repetition penalty (compared with transformers' processor), and seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from megrez_mlc.errors import MegrezError
from megrez_mlc.runtime.request import Request
from megrez_mlc.runtime.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    sample_token,
    sampling_problem,
    token_logprob,
)
from megrez_mlc.runtime.tokenizer import Tokenizer

# Token ids deliberately not in probability order, so a sampler that confuses ids with ranks is caught.
LOGITS = np.array([0.5, 2.0, -1.0, 1.0, -2.0, 1.5, 0.0, -0.5], dtype=np.float32)


def draws(logits: np.ndarray, params: SamplingParams, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([sample_token(logits, params, rng) for _ in range(n)])


def transformers_probabilities(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float
) -> np.ndarray:
    """The distribution transformers' generate() samples from, its warpers applied in its order."""
    scores = torch.from_numpy(logits)[None]
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    for warper in warpers:
        scores = warper(None, scores)
    return scores.softmax(-1)[0].double().numpy()


# --- checks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": math.inf}, "temperature must be a finite number >= 0 (0 = greedy), got inf"),
        ({"temperature": -0.5}, "temperature must be a finite number >= 0 (0 = greedy), got -0.5"),
        ({"top_p": math.nan}, "top_p must be in (0, 1], got nan"),
        ({"top_p": 1.01}, "top_p must be in (0, 1], got 1.01"),
        ({"top_p": -0.1}, "top_p must be in (0, 1], got -0.1"),
        ({"top_k": 2.0}, "top_k must be an integer >= 0 (0 = no top-k cut), got 2.0"),
        ({"top_k": True}, "top_k must be an integer >= 0 (0 = no top-k cut), got True"),
        (
            {"repetition_penalty": math.nan},
            "repetition_penalty must be a finite number > 0 (1 = none), got nan",
        ),
        ({"repetition_penalty": 0}, "repetition_penalty must be a finite number > 0 (1 = none), got 0"),
        ({"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
        ({"seed": -(2**70)}, f"seed must be an integer >= 0, got {-(2**70)}"),
        ({"max_tokens": -3}, "max_tokens must be an integer >= 1, got -3"),
    ],
)
def test_bad_settings_are_refused_with_the_range(settings: dict, message: str) -> None:
    with pytest.raises(MegrezError) as caught:
        SamplingParams(**settings)
    assert str(caught.value) == message


def test_the_edges_of_each_range_are_accepted() -> None:
    params = SamplingParams(
        max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1e-3, seed=2**70
    )
    assert (params.max_tokens, params.top_p, params.seed) == (1, 1.0, 2**70)
    assert SamplingParams(top_k=np.int64(5), seed=np.uint32(7), top_p=np.float32(0.5)).top_k == 5
    assert sampling_problem("seed", None) is None
    assert sampling_problem("top_p", 1e-12) is None
    assert sampling_problem("top_p", 0) == "must be in (0, 1], got 0"


# --- greedy ----------------------------------------------------------------------------------------------


def test_greedy_is_argmax_with_ties_to_the_lower_id() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((50, 315)).astype(np.float32)
    greedy = SamplingParams(temperature=0)
    assert [sample_token(row, greedy, rng) for row in logits] == logits.argmax(axis=1).tolist()
    tied = np.array([1.0, 3.0, -2.0, 3.0], dtype=np.float32)
    assert sample_token(tied, greedy, rng) == 1 == int(torch.argmax(torch.from_numpy(tied)))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=2.0, top_k=1, top_p=1.0),
        SamplingParams(temperature=2.0, top_p=1e-9),
    ],
    ids=["top_k=1", "tiny top_p"],
)
def test_top_k_1_and_a_tiny_top_p_only_ever_pick_the_top_token(params: SamplingParams) -> None:
    assert set(draws(LOGITS, params, 300).tolist()) == {1}


# --- the distribution sampled from -----------------------------------------------------------------------

CASES = [  # (temperature, top_k, top_p)
    # no cut: top_p 1 keeps every token
    (1.0, 0, 1.0),
    (0.5, 0, 1.0),
    (2.0, 0, 1.0),
    (1.0, 3, 1.0),
    # cumulative mass 0.403, 0.647, 0.795, 0.885: the token that crosses 0.8 is kept
    (1.0, 0, 0.8),
    # top-k first: 0.506, 0.814 of the three kept, so two remain (top-p first would keep three)
    (1.0, 3, 0.8),
    (1.3, 4, 0.9),
]
DRAWS = 20_000
# Hoeffding: a token of probability p is drawn a fraction f of DRAWS times with P(|f - p| >= eps) <=
# 2 exp(-2 DRAWS eps^2). A union over the 8 tokens of all CASES gives P(any case fails) <= 1e-6 for:
TOLERANCE = math.sqrt(math.log(2 * LOGITS.size * len(CASES) / 1e-6) / (2 * DRAWS))  # about 0.022


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), CASES)
def test_draws_follow_transformers_distribution(temperature: float, top_k: int, top_p: float) -> None:
    expected = transformers_probabilities(LOGITS, temperature, top_k, top_p)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    counts = np.bincount(draws(LOGITS, params, DRAWS), minlength=LOGITS.size)
    np.testing.assert_array_equal(counts[expected == 0], 0)  # a token cut off is never drawn
    assert np.abs(counts / DRAWS - expected).max() < TOLERANCE, (counts / DRAWS, expected)


def test_top_k_keeps_every_token_tied_at_the_cut_as_transformers_does() -> None:
    logits = np.array([3.0, 1.0, 0.0, 1.0, 1.0], dtype=np.float32)
    expected = transformers_probabilities(logits, 1.0, 2, 1.0)
    assert np.flatnonzero(expected).tolist() == [0, 1, 3, 4]
    # each kept token has probability above 0.09, so missing one in 2000 draws has probability below 1e-80
    drawn = draws(logits, SamplingParams(temperature=1.0, top_k=2, top_p=1.0), 2000)
    assert set(drawn.tolist()) == {0, 1, 3, 4}


def test_top_p_breaks_a_tie_at_the_cut_towards_the_lower_id() -> None:
    """Probabilities 0.2, 0.4, 0.2, 0.2: top_p 0.5 needs one of the three tied tokens, and it is token 0;
    top_p 0.7 needs two, tokens 0 and 2. (transformers' order among ties is torch's unstable sort's.)"""
    logits = np.array([0.0, math.log(2), 0.0, 0.0], dtype=np.float32)
    for top_p, kept in ((0.5, {0, 1}), (0.7, {0, 1, 2})):
        drawn = draws(logits, SamplingParams(temperature=1.0, top_p=top_p), 2000)
        assert set(drawn.tolist()) == kept


def test_a_top_k_of_the_vocabulary_or_more_is_no_cut() -> None:
    """The same seed draws the same tokens with top_k 0 (off), the vocabulary size, and beyond it."""
    rng = np.random.default_rng(2)
    logits = rng.standard_normal(315).astype(np.float32)
    runs = [draws(logits, SamplingParams(temperature=1.0, top_k=k, top_p=1.0), 200) for k in (0, 315, 10**6)]
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])
    assert len(set(runs[0].tolist())) > 100  # a wide distribution: equal runs mean equal draws, not luck


# --- seeds ------------------------------------------------------------------------------------------------


def test_the_same_seed_draws_the_same_tokens_and_another_seed_others() -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=6)
    first, again, other = (draws(LOGITS, params, 200, seed) for seed in (7, 7, 8))
    np.testing.assert_array_equal(first, again)
    assert (first != other).sum() > 50  # independent draws from this distribution agree 3 times in 10


def test_a_request_draws_from_its_seed(tokenizer: Tokenizer) -> None:
    """SamplingParams.seed seeds a request's generator; Request.create's seed (one per prompt of a batch)
    overrides it."""
    steps = np.random.default_rng(3).standard_normal((40, tokenizer.vocab_size)).astype(np.float32)

    def tokens(params: SamplingParams, seed: int | None = None) -> list[int]:
        request = Request.create([0], params, tokenizer, 1000, seed=seed)
        for logits in steps:
            request.step(logits)
        return request.output_ids

    def seeded(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=40, temperature=1.0, top_p=1.0, seed=seed, ignore_eos=True)

    assert len(tokens(seeded(11))) == 40
    assert tokens(seeded(11)) == tokens(seeded(11)) == tokens(seeded(99), seed=11)
    assert tokens(seeded(11)) != tokens(seeded(12))


# --- repetition penalty ----------------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.3, 0.7, 5.0])
def test_repetition_penalty_equals_transformers(penalty: float) -> None:
    rng = np.random.default_rng(4)
    logits = (3 * rng.standard_normal(315)).astype(np.float32)
    logits[:3] = (0.0, 2.5, -2.5)
    seen = [0, 1, 2, *rng.integers(0, 315, 40).tolist(), 1, 2]  # repeats count once
    before = logits.copy()
    ours = apply_repetition_penalty(logits, seen, penalty)
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    theirs = processor(torch.tensor([seen]), torch.from_numpy(logits.copy())[None])[0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-7, atol=0)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(logits, before)  # the caller's logits are left alone
    assert ours[:3].tolist() == [
        0.0,
        np.float32(2.5) / np.float32(penalty),
        np.float32(-2.5) * np.float32(penalty),
    ]
    unseen = np.setdiff1d(np.arange(315), seen)
    np.testing.assert_array_equal(ours[unseen], logits[unseen])


def test_repetition_penalty_of_1_or_nothing_seen_changes_nothing() -> None:
    assert apply_repetition_penalty(LOGITS, [1, 2, 3], 1.0) is LOGITS
    assert apply_repetition_penalty(LOGITS, [], 2.0) is LOGITS


def test_repetition_penalty_moves_the_greedy_choice() -> None:
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    rng = np.random.default_rng(0)
    positive = np.array([3.0, 2.0, -1.0], dtype=np.float32)
    assert sample_token(positive, params, rng) == 0
    assert sample_token(positive, params, rng, seen=[0]) == 1  # 3 / 2 < 2
    negative = np.array([-1.0, -1.5, -4.0], dtype=np.float32)
    assert sample_token(negative, params, rng, seen=[0, 2]) == 1  # -1 * 2 < -1.5


def test_logprobs_are_log_softmax_of_the_raw_logits() -> None:
    """The token's log-probability and the top 3 (most likely first, the lower id first on a tie), as
    torch.log_softmax gives them."""
    logits = np.array([0.5, 2.0, -1.0, 1.0, -2.0, 2.0, 0.0, -0.5], dtype=np.float32)
    reference = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), dim=0).numpy()
    entry = token_logprob(logits, 3, top=3)
    assert entry.token_id == 3 and entry.logprob == pytest.approx(reference[3], abs=1e-12)
    assert [i for i, _ in entry.top] == [1, 5, 3]
    assert [lp for _, lp in entry.top] == pytest.approx(reference[[1, 5, 3]].tolist(), abs=1e-12)
    assert token_logprob(logits, 0, top=0).top == ()
    with pytest.raises(MegrezError, match=r"^top_logprobs must be in \[0, 20\]"):
        SamplingParams(logprobs=True, top_logprobs=21)
