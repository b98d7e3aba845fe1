"""offload/registry.py: one lookup for every registry, one error shape for every unknown name."""

from __future__ import annotations

import pytest

from offload.errors import ConfigError, PolicyError
from offload.registry import check_name, lookup

REG = {"lru": 1, "fifo": 2, "lfu": 3}


def test_lookup_is_case_insensitive():
    assert lookup(REG, "LRU", "policy") == 1


def test_unknown_names_list_the_known_ones_sorted_or_in_order():
    with pytest.raises(ConfigError, match="unknown policy 'mru'") as info:
        lookup(REG, "mru", "policy")
    assert info.value.hint == "use one of: fifo, lfu, lru"
    with pytest.raises(PolicyError) as info:
        lookup(REG, "mru", "policy", PolicyError, also=("none",), ordered=True)
    assert info.value.hint == "use one of: none, lru, fifo, lfu"


def test_check_name_accepts_the_extra_names():
    check_name(REG, "none", "predictor", also=("none",))
    with pytest.raises(ConfigError, match="unknown predictor 'x'"):
        check_name(REG, "x", "predictor", also=("none",))
