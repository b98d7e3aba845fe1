"""Task patterns at run time on the bundled tiny-moe: warm start changes no token and exactly the counts it should,
matching tells its two workloads apart, and --prune routes among the retained experts and reads no more."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import offload
from offload.errors import BudgetError, ConfigError
from offload.memory.patterns import GENERIC, load_patterns
from offload.model.forward import RouteCollector
from offload.tools.profile import model_routes, profile
from tests.paths import ROOT

PROMPTS = ROOT / "scripts" / "results" / "traces"  # tiny-moe's two workloads: held-out stdlib code, stdlib prose
WORKLOADS = {"code": "stdlib-heldout", "prose": "stdlib-prose"}


def prompts(task: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in (PROMPTS / f"{WORKLOADS[task]}.prompts.jsonl").open()]


@pytest.fixture(scope="module")
def patterns_file(tmp_path_factory):
    """Patterns of tiny-moe profiled on the first half of each workload's prompts (the second half is held apart)."""
    folder = tmp_path_factory.mktemp("patterns")
    for task in WORKLOADS:
        (folder / f"{task}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(task)[:20]))
    m = offload.from_pretrained("tiny-moe")
    found = profile(m, {t: [folder / f"{t}.jsonl"] for t in WORKLOADS}, {})
    found.save(folder / "patterns.json")
    return folder / "patterns.json"


def tokens(m, texts, new=12) -> list[list[int]]:
    return [m.generate(m.encode(t), max_new_tokens=new)[0].tolist() for t in texts]


def test_matching_tells_the_two_workloads_apart_on_held_apart_prompts(patterns_file):
    # Floor 0.9: measured 40 of 40 (this log-likelihood matching; the cosine of frequency vectors chose 38).
    m = offload.from_pretrained("tiny-moe", patterns=patterns_file, expert_budget="25%")
    right = 0
    for task in WORKLOADS:
        for text in prompts(task)[20:]:
            m.generate(m.encode(text), max_new_tokens=2)
            right += m.stats.task.last == task
    assert right / 40 >= 0.9, right
    assert sum(m.stats.task.matches.values()) == 40 and 0.5 <= m.stats.task.confidence <= 1


@pytest.mark.parametrize("budget, policy, predictor", [("25%", "lru", "none"), ("4", "fifo", "none"),
                                                       ("50%", "predictive", "markov"), ("10", "layer-lru", "learned"),
                                                       ("30%", "predictive", "learned"), ("100%", "lfu", "pregate")])
def test_warm_start_changes_no_token(patterns_file, budget, policy, predictor):
    texts = [prompts("code")[25], prompts("prose")[30]]
    options = dict(expert_budget=budget, policy=policy, predictor=predictor)
    cold = offload.from_pretrained("tiny-moe", **options)
    warm = offload.from_pretrained("tiny-moe", patterns=patterns_file, **options)
    assert tokens(warm, texts) == tokens(cold, texts)
    c, w = cold.stats.total, warm.stats.total
    assert c.accesses == w.accesses and w.warm_hits <= w.warm_loads
    assert (w.warm_loads > 0) == (budget != "100%")  # at 100% pregate's prefetches left nothing to load
    assert sum(warm.stats.task.matches.values()) == 2


def routed_keys(m, text: str, new: int) -> tuple[set, set]:
    """The (model layer, expert) keys the prompt's prefill and its decode steps route to."""
    seen, steps = [], []
    m.model.route_observers.append(lambda layer, experts, weights: seen.append((layer, experts)))
    m.generate(m.encode(text), max_new_tokens=new)
    layers = m.model.moe_layers
    for layer, experts in seen:
        steps.append({(layer, int(e)) for e in experts.unique()})
    prefill = set().union(*steps[: len(layers)])
    return prefill, set().union(*steps[len(layers):])


def test_warm_start_counts_exactly_at_full_budget(patterns_file):
    # With a slot for every expert nothing is evicted: each key misses once, at its first use. Warm start loads the
    # matched task's ranked keys that prefill left out; those decode then uses are hits instead of misses.
    text = prompts("code")[33]
    cold = offload.from_pretrained("tiny-moe", expert_budget="100%")
    prefill, decode = routed_keys(cold, text, 10)
    warm = offload.from_pretrained("tiny-moe", expert_budget="100%", patterns=patterns_file)
    warm.generate(warm.encode(text), max_new_tokens=10)
    pattern = load_patterns(patterns_file).task(warm.stats.task.last)
    layers = warm.model.moe_layers
    loaded = {(layers[m], e) for m, e in pattern.ranked_keys()} - prefill
    c, w = cold.stats.total, warm.stats.total
    assert c.misses == len(prefill | decode) and c.evictions == w.evictions == 0
    assert w.warm_loads == len(loaded) and w.warm_hits == len(loaded & decode)
    assert (w.hits, w.misses) == (c.hits + w.warm_hits, c.misses - w.warm_hits)


@pytest.mark.parametrize("batch_size, scheduler", [(1, "fifo"), (3, "fifo"), (3, "expert-aware")])
def test_warm_start_changes_no_token_in_continuous_batching(patterns_file, batch_size, scheduler):
    texts = prompts("code")[20:23] + prompts("prose")[20:23]
    options = dict(expert_budget="25%", batch_size=batch_size, scheduler=scheduler)
    cold = offload.from_pretrained("tiny-moe", **options)
    warm = offload.from_pretrained("tiny-moe", patterns=patterns_file, **options)
    got = [c.token_ids for c in warm.generate_many(texts, max_new_tokens=8)]
    assert got == [c.token_ids for c in cold.generate_many(texts, max_new_tokens=8)]
    assert sum(warm.stats.task.matches.values()) == len(texts)


def test_a_request_s_warm_start_keeps_what_running_requests_use(patterns_file):
    m = offload.from_pretrained("tiny-moe", patterns=patterns_file, expert_budget="8", batch_size=2)
    hook, kept = m.model.request_hook, []

    def prefilled(routes, running=()):
        theirs = set(running) & m.cache.resident
        match = type(hook).prefilled(hook, routes, running)
        kept.append((theirs, theirs <= m.cache.resident))
        return match

    hook.prefilled = prefilled
    m.generate_many(prompts("code")[20:24] + prompts("prose")[20:24], max_new_tokens=6)
    assert any(theirs for theirs, _ in kept)  # later requests found others' experts resident ...
    assert all(ok for _, ok in kept)           # ... and their warm start left them there
    assert m.stats.total.warm_loads > 0


def test_pruning_to_every_expert_is_the_unpruned_model(patterns_file):
    texts = [prompts("code")[21], prompts("prose")[22]]
    full = offload.from_pretrained("tiny-moe")
    pruned = offload.from_pretrained("tiny-moe", patterns=patterns_file, prune="100%")
    assert tokens(pruned, texts) == tokens(full, texts)
    ids = full.encode(texts[0])
    assert torch.equal(pruned(ids), full(ids))
    assert pruned.stats.total.pruned_mass == 0 and pruned.stats.task.pruned_to == GENERIC


@pytest.mark.parametrize("prune, task", [("50%", "code"), ("2", "prose"), ("0.75", None)])
def test_pruned_routing_never_picks_a_dropped_expert_and_reads_nothing_after_warm_up(patterns_file, prune, task):
    m = offload.from_pretrained("tiny-moe", patterns=patterns_file, prune=prune, task=task, expert_budget="auto")
    keep = {"50%": 4, "2": 2, "0.75": 6}[prune]
    retained = load_patterns(patterns_file).task(task or GENERIC).top(keep)
    assert m.cache.num_slots == keep * 5 and m.cache.resident == {
        (layer, int(e)) for layer, row in zip(m.model.moe_layers, retained) for e in row}
    reads = []
    read = m.cache.store.reader.read
    m.cache.store.reader.read = lambda *args: reads.append(args) or read(*args)
    for text in prompts("code")[30:32] + prompts("prose")[30:32]:
        m.generate(m.encode(text), max_new_tokens=6)
    assert reads == [] and m.stats.total.misses == 0  # the slow tier is never touched after warm-up
    for layer in m.model.moe_layers:
        assert 0 < m.stats.layer(layer).pruned_share < 1


def test_routes_under_pruning_stay_within_the_retained_experts(patterns_file):
    m = offload.from_pretrained("tiny-moe", patterns=patterns_file, prune="3", task="prose")
    retained = load_patterns(patterns_file).task("prose").top(3)
    seen = []
    m.model.route_observers.append(lambda layer, experts, weights: seen.append((layer, experts.unique().tolist())))
    m.generate(m.encode(prompts("code")[35]), max_new_tokens=8)
    index = {layer: m for m, layer in enumerate(m.model.moe_layers)}
    assert seen and all(set(used) <= set(retained[index[layer]].tolist()) for layer, used in seen)


def test_pruning_refusals(patterns_file):
    with pytest.raises(ConfigError, match="--prune needs --patterns"):
        offload.from_pretrained("tiny-moe", prune="50%")
    with pytest.raises(ConfigError, match="--predictor markov would only fetch"):
        offload.from_pretrained("tiny-moe", patterns=patterns_file, prune="50%", predictor="markov")
    with pytest.raises(BudgetError, match="keeps 20 experts, more than the expert budget '25%'"):
        offload.from_pretrained("tiny-moe", patterns=patterns_file, prune="50%", expert_budget="25%")
    with pytest.raises(ConfigError, match="fewer than the 2"):
        offload.from_pretrained("tiny-moe", patterns=patterns_file, prune="12.5%")
    with pytest.raises(ConfigError, match="has no task 'math'"):
        offload.from_pretrained("tiny-moe", patterns=patterns_file, task="math")


def test_patterns_of_another_model_are_refused_before_loading(patterns_file):
    with pytest.raises(ConfigError, match="was profiled on 'tiny-moe' .* not on 'tiny-moe-64'"):
        offload.from_pretrained("tiny-moe-64", patterns=patterns_file)


def test_profile_routes_are_the_model_s_own(patterns_file):
    m = offload.from_pretrained("tiny-moe")
    text = prompts("code")[0]
    experts, weights = model_routes(m, [text], context=16)  # windows of 16 tokens, each a fresh forward
    ids = m.encode(text)[0]
    assert experts.shape == (len(ids), 5, 2) and np.allclose(weights.sum(-1), 1, atol=1e-6)  # Mixtral renormalises
    collector = RouteCollector()
    m.model.route_observers.append(collector)
    m(ids[None, :16])
    assert np.array_equal(collector.take(), experts[:16])
