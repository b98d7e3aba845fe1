"""numba's disk cache of the kernels is keyed on all kernel sources, so an edit in one file recompiles its callers."""

from __future__ import annotations

from numba.core.dispatcher import Dispatcher

from offload.experts.kernels import cache, jobs, pool, rows


def test_every_cached_kernel_is_stamped_with_all_kernel_sources():
    cached = [f for module in (rows, jobs, pool) for f in vars(module).values()
              if isinstance(f, Dispatcher) and hasattr(f._cache, "_cache_file")]  # cache=False: a NullCache
    assert {f.py_func.__name__ for f in cached} >= {"int_rows", "run", "_serve", "_lead"}
    for f in cached:
        assert f._cache._cache_file._source_stamp == cache._sources_hash(), f.py_func.__name__


def test_the_stamp_changes_with_any_kernel_source(tmp_path, monkeypatch):
    for name in ("rows.py", "pool.py"):
        (tmp_path / name).write_text("x = 1\n")
    monkeypatch.setattr(cache, "__file__", str(tmp_path / "cache.py"))
    cache._sources_hash.cache_clear()
    before = cache._sources_hash()
    (tmp_path / "rows.py").write_text("x = 2\n")
    cache._sources_hash.cache_clear()
    try:
        assert cache._sources_hash() != before
    finally:
        monkeypatch.undo()
        cache._sources_hash.cache_clear()
