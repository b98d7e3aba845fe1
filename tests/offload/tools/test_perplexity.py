"""offload/tools/perplexity.py: windows score every token once with the context they allow, and the value
equals transformers' sliding-window recipe on the same weights, at any expert budget."""

from __future__ import annotations

import math

import pytest
import torch

import offload
from offload.errors import ConfigError
from offload.tools.perplexity import perplexity, windows

IDS = [(7 * i + 3) % 90 + 3 for i in range(40)]


@pytest.mark.parametrize("n, context, stride", [(10, 4, 2), (10, 4, 4), (40, 16, 5), (3, 512, 512), (17, 17, 1)])
def test_windows_score_each_token_at_most_once_with_a_predecessor(n, context, stride):
    scored = [t for begin, end, count in windows(n, context, stride) for t in range(end - count, end)]
    assert len(scored) == len(set(scored)) and 0 not in scored
    assert all(end - begin <= context and end - count > begin for begin, end, count in windows(n, context, stride))
    if stride < context:
        assert sorted(scored) == list(range(1, n))  # overlapping windows score every token but the first


def test_bad_windows_and_short_texts():
    with pytest.raises(ConfigError, match="do not make windows"):
        windows(10, 4, 5)
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        perplexity(lambda ids: None, [5])


def _transformers_nll(path, ids, context, stride) -> tuple[float, int]:
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for begin, end, n in windows(len(ids), context, stride):
        with torch.no_grad():
            logits = ref(torch.tensor([ids[begin:end]])).logits[0]
        nll += float(torch.nn.functional.cross_entropy(logits[-n - 1 : -1], torch.tensor(ids[end - n : end]),
                                                       reduction="sum"))
        count += n
    return nll, count


@pytest.mark.parametrize("budget", [1, "100%"])
def test_equals_transformers_on_the_same_weights(tiny_dir, budget):
    path = tiny_dir("qwen3_moe")
    model = offload.from_pretrained(path, device="cpu", expert_budget=budget)
    result = perplexity(model, IDS, context=16, stride=8)
    nll, count = _transformers_nll(path, IDS, 16, 8)
    # float32 forward passes of the same weights: the summed NLL agrees to float32 accumulation error
    assert result.tokens == count == len(IDS) - 1
    assert result.nll == pytest.approx(nll, rel=1e-5) and result.perplexity == pytest.approx(math.exp(nll / count))
