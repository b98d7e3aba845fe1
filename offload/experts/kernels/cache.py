"""numba's on-disk cache, keyed on every kernel source file rather than the one a function is written in.

numba stamps a ``cache=True`` function's cache with its own file's hash only. The pool's workers (pool.py) compile
the kernels of rows.py into their own code, so after an edit of rows.py alone they would load the old kernels from
the cache (seen: a changed kernel ran in the 1-thread path and the old one in the 2-thread path). Tying every
kernel's stamp to the hash of all the files here makes any change recompile all of them once.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from numba.core.dispatcher import Dispatcher


@functools.cache
def _sources_hash() -> bytes:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.digest()


def tie(namespace: dict) -> None:
    """Stamp the caches of the numba functions in a module's namespace with the hash of every kernel source."""
    for value in list(namespace.values()):
        index = getattr(getattr(value, "_cache", None), "_cache_file", None)  # numba's IndexDataCacheFile
        if isinstance(value, Dispatcher) and index is not None:
            index._source_stamp = _sources_hash()  # read when the index is loaded or saved, after this
