"""offload/runtime/sampling.py: the filters equal transformers' logits warpers, configs take generation_config's
defaults, and sampling draws from the filtered distribution (seeded: reproducible)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.errors import ConfigError
from offload.runtime.sampling import SamplingConfig, filter_logits, sample


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), temperature=st.floats(0.3, 2.0), top_k=st.integers(0, 40),
       top_p=st.floats(0.05, 1.0), vocab=st.integers(2, 64))
def test_filters_equal_transformers_warpers(seed, temperature, top_k, top_p, vocab):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if 0 < top_k < vocab:  # transformers' generate() only adds the warper for such k
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = filter_logits(logits, temperature, top_k, top_p)
    # Same operations in the same order on the same float32 values: identical, -inf where filtered.
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)], rtol=0, atol=0)


def test_greedy_is_argmax_and_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert sample(logits, SamplingConfig()).tolist() == [1]
    top2 = SamplingConfig(do_sample=True, top_k=2)
    draws = [int(sample(logits, top2, torch.Generator().manual_seed(s))) for s in range(60)]
    assert set(draws) == {1, 3}  # only the two likeliest ever come out, and both do
    seeded = SamplingConfig(do_sample=True, seed=5)
    a = sample(logits.repeat(8, 1), seeded, seeded.make_generator())
    b = sample(logits.repeat(8, 1), seeded, seeded.make_generator())
    assert torch.equal(a, b)


def test_generation_config_gives_the_defaults_and_options_win():
    gen = {"do_sample": True, "temperature": 0.7, "top_k": 10, "top_p": 0.9, "eos_token_id": [2, 7],
           "max_new_tokens": 5}
    config = SamplingConfig.from_generation_config(gen, model_eos=(1,), model_pad=0)
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (True, 0.7, 10, 0.9)
    assert config.eos_token_ids == (2, 7) and config.max_new_tokens == 5 and config.pad == 0
    over = SamplingConfig.from_generation_config(gen, (1,), None, temperature=1.2, eos_token_id=[], top_k=None)
    assert over.temperature == 1.2 and over.eos_token_ids == () and over.top_k == 10  # None: not given
    plain = SamplingConfig.from_generation_config({}, model_eos=(3,))
    assert plain.eos_token_ids == (3,) and plain.pad == 3 and plain.top_k == 50 and not plain.do_sample


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0), "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(seed=2**64), r"seed must be an integer in \[0, 2\*\*64\)"), (dict(seed=-1), "seed must be"),
    (dict(seed=True), "seed must be"), (dict(top_p=0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"), (dict(top_k=-1), "top_k must be"),
    (dict(max_new_tokens=-2), "max_new_tokens must be"), (dict(max_new_tokens=2.5), "max_new_tokens must be"),
])
def test_bad_values_are_one_line_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplingConfig(**kwargs)


def test_unknown_option_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown sampling option 'typical_p'"):
        SamplingConfig.from_generation_config({}, typical_p=0.5)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-30])
def test_a_vanishing_temperature_samples_the_top_token_and_never_nan(temperature):
    # logits / 1e-300 overflows float32 (inf - inf = nan in the softmax, which used to kill the server's engine):
    # the limit of the distribution as the temperature goes to 0 is the argmax (ties shared)
    logits = torch.tensor([[0.5, 3.0, -2.0, 2.99], [1.0, 1.0, -5.0, 0.0]])
    config = SamplingConfig(do_sample=True, temperature=temperature, top_k=0)
    filtered = filter_logits(logits, temperature, 0, 1.0)
    probs = filtered.softmax(dim=-1)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(2))
    draws = [sample(logits, config, torch.Generator().manual_seed(s)).tolist() for s in range(20)]
    assert {d[0] for d in draws} == {1} and {d[1] for d in draws} == {0, 1}   # row 2 ties its top two


def test_non_finite_logits_are_an_error_not_a_token():
    from offload.errors import NumericError

    for bad in (float("nan"), float("inf")):
        with pytest.raises(NumericError, match="NaN or Inf logits"):
            sample(torch.tensor([[0.0, bad, 1.0]]), SamplingConfig())
