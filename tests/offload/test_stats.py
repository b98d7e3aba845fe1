"""offload/stats.py: totals add up the layers, derived rates are what their names say, reset empties."""

from __future__ import annotations

from offload.stats import PredictionStats, Stats


def test_totals_and_rates():
    stats = Stats()
    stats.layer(0).hits, stats.layer(0).misses, stats.layer(0).steps, stats.layer(0).distinct_experts = 3, 1, 2, 5
    stats.layer(3).hits, stats.layer(3).misses, stats.layer(3).steps, stats.layer(3).distinct_experts = 1, 3, 2, 3
    stats.decode_tokens, stats.decode_time_s = 10, 2.0
    t = stats.total
    assert (t.hits, t.misses, t.accesses, t.hit_rate, t.distinct_per_step) == (4, 4, 8, 0.5, 2.0)
    d = stats.to_dict()
    assert d["total"]["hit_rate"] == 0.5 and d["decode_tokens_per_s"] == 5.0 and list(d["layers"]) == ["0", "3"]
    assert "4 hits, 4 misses (50.0% hit rate)" in stats.summary()
    stats.reset()
    assert stats.total.accesses == 0 and stats.decode_tokens == 0 and not stats.layers


def test_prediction_precision_and_recall():
    p = PredictionStats(predicted=8, actual=4, correct=2)
    assert (p.precision, p.recall) == (0.25, 0.5) and PredictionStats().precision == 0.0
