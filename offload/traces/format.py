"""Reading and writing routing traces (`offload-routing-trace/1`), the one place that knows the format.

A trace is gzip'd (or plain) JSON Lines: line 1 a header naming the model's shape, then one object
per token in execution order with the top-k expert ids and routing weights of every MoE layer.
The runtime records traces token by token with :class:`TraceWriter`; the simulator, predictors and
scripts read them with :func:`read_trace` into numpy arrays. Every malformed file raises
:class:`~offload.errors.TraceError` with one line naming the file, the line and what is wrong, so a
bad trace never turns into silently wrong cache figures.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np

from offload.errors import TraceError
from offload.files import atomic_output

log = logging.getLogger(__name__)

FORMAT = "offload-routing-trace/1"
PHASES = ("prefill", "decode")
_REQUIRED_HEADER = ("format", "model", "num_layers", "num_experts", "top_k")
_RECORD_FIELDS = ("seq", "pos", "phase", "experts", "weights")
_GZIP_MAGIC = b"\x1f\x8b"


def _shape_problem(num_layers: int, num_experts: int, top_k: int) -> str | None:
    """Why a (layers, experts, top_k) shape is impossible, or None; shared by header and reader."""
    if num_layers < 1 or num_experts < 1:
        return f"num_layers and num_experts must be >= 1, got {num_layers} and {num_experts}"
    if not 1 <= top_k <= num_experts:
        return f"top_k must be in 1..num_experts={num_experts}, got {top_k}"
    return None


@dataclass(frozen=True)
class TraceHeader:
    """Line 1 of a trace: the model's MoE shape plus free fields (source, workload, ...) that round-trip."""

    model: str
    num_layers: int
    num_experts: int
    top_k: int
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Any other JSON-serialisable header fields, written back unchanged."""

    def __post_init__(self) -> None:
        problem = _shape_problem(self.num_layers, self.num_experts, self.top_k)
        if problem:
            raise TraceError(f"bad trace header: {problem}")
        clash = sorted(set(self.extra) & set(_REQUIRED_HEADER))
        if clash:
            raise TraceError(f"bad trace header: extra fields {clash} shadow required fields")

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "model": self.model, "num_layers": self.num_layers,
                "num_experts": self.num_experts, "top_k": self.top_k, **self.extra}


@dataclass(frozen=True)
class TraceRecord:
    """One token: where it is (seq, pos, phase) and its routing at every layer, top-1 first."""

    seq: int
    pos: int
    phase: str
    experts: tuple[tuple[int, ...], ...]  # [layers][top_k]
    weights: tuple[tuple[float, ...], ...]  # [layers][top_k]
    imputed: tuple[int, ...] = ()
    """Layers whose slot was not recorded and was filled in (see the trace README)."""


@dataclass(frozen=True, eq=False)
class Trace:
    """A whole trace as arrays, for vectorised analysis and the simulator."""

    header: TraceHeader
    seq: np.ndarray  # [tokens] int32
    pos: np.ndarray  # [tokens] int32
    phase: np.ndarray  # [tokens] int8, index into PHASES
    experts: np.ndarray  # [tokens, layers, top_k] int16 (int32 past 32767 experts)
    weights: np.ndarray  # [tokens, layers, top_k] float32
    imputed: np.ndarray  # [tokens, layers] bool
    path: str = ""

    def __len__(self) -> int:
        return int(self.seq.shape[0])

    @property
    def num_accesses(self) -> int:
        return int(self.experts.size)

    def records(self) -> Iterator[TraceRecord]:
        """The tokens as records; weights are the shortest decimals of the stored float32 values."""
        for t in range(len(self)):
            yield TraceRecord(
                seq=int(self.seq[t]), pos=int(self.pos[t]), phase=PHASES[self.phase[t]],
                experts=tuple(map(tuple, self.experts[t].tolist())),
                weights=tuple(tuple(_f32_floats(row)) for row in self.weights[t]),
                imputed=tuple(np.flatnonzero(self.imputed[t]).tolist()))


def _f32_floats(values: np.ndarray) -> list[float]:
    """float32 values as the shortest Python floats that read back to them (0.695958, not 0.69595801...)."""
    return [float(str(v)) for v in np.asarray(values, dtype=np.float32)]


# --------------------------------------------------------------------------------------------- read


def _error(where: str, what: str, hint: str = "the format is described in offload/traces/format.py") -> TraceError:
    return TraceError(f"{where}: {what}", hint)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite_number(x: object) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)  # type: ignore[arg-type]


def _parse_header(obj: object, where: str) -> TraceHeader:
    if not isinstance(obj, dict):
        raise _error(where, f"header must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in _REQUIRED_HEADER if k not in obj]
    if missing:
        raise _error(where, f"header lacks {', '.join(missing)}")
    if obj["format"] != FORMAT:
        raise _error(where, f"format is {obj['format']!r}, expected {FORMAT!r}")
    if not isinstance(obj["model"], str):
        raise _error(where, f"model must be a string, got {obj['model']!r}")
    if not all(_is_int(obj[k]) for k in ("num_layers", "num_experts", "top_k")):
        raise _error(where, "num_layers, num_experts and top_k must be integers")
    problem = _shape_problem(obj["num_layers"], obj["num_experts"], obj["top_k"])
    if problem:
        raise _error(where, problem)
    extra = {k: v for k, v in obj.items() if k not in _REQUIRED_HEADER}
    return TraceHeader(obj["model"], obj["num_layers"], obj["num_experts"], obj["top_k"], extra)


def _check_matrix(rows: object, name: str, h: TraceHeader, where: str, is_item: Any) -> list[list[Any]]:
    """Check a [layers][top_k] list of lists whose items pass ``is_item``."""
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise _error(where, f"'{name}' must be a list of {h.num_layers} lists")
    if len(rows) != h.num_layers:
        raise _error(where, f"'{name}' has {len(rows)} layers, header says num_layers={h.num_layers}")
    for layer, row in enumerate(rows):
        if len(row) != h.top_k:
            raise _error(where, f"'{name}' layer {layer} has {len(row)} entries, header says top_k={h.top_k}")
        if not all(is_item(x) for x in row):
            raise _error(where, f"'{name}' layer {layer} has a bad entry: {row}")
    return rows


def _parse_record(obj: object, h: TraceHeader, where: str) -> tuple[int, int, int, list, list, list]:
    """Validate one token line -> (seq, pos, phase index, experts, weights, imputed layers)."""
    if not isinstance(obj, dict):
        raise _error(where, f"record must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in _RECORD_FIELDS if k not in obj]
    if missing:
        raise _error(where, f"record lacks {', '.join(missing)}")
    if not (_is_int(obj["seq"]) and _is_int(obj["pos"]) and obj["seq"] >= 0 and obj["pos"] >= 0):
        raise _error(where, f"seq and pos must be integers >= 0, got {obj['seq']!r} and {obj['pos']!r}")
    if obj["phase"] not in PHASES:
        raise _error(where, f"phase is {obj['phase']!r}, expected one of {PHASES}")
    experts = _check_matrix(obj["experts"], "experts", h, where, _is_int)
    for layer, row in enumerate(experts):
        bad = [e for e in row if not 0 <= e < h.num_experts]
        if bad:
            raise _error(where, f"expert id {bad[0]} at layer {layer} out of range 0..{h.num_experts - 1}")
        if len(set(row)) != len(row):
            raise _error(where, f"expert ids repeat at layer {layer}: {row}")
    weights = _check_matrix(obj["weights"], "weights", h, where, _is_finite_number)
    imputed = obj.get("imputed", [])
    if not isinstance(imputed, list) or not all(_is_int(x) and 0 <= x < h.num_layers for x in imputed):
        raise _error(where, f"'imputed' must list layers in 0..{h.num_layers - 1}, got {imputed!r}")
    return obj["seq"], obj["pos"], PHASES.index(obj["phase"]), experts, weights, imputed


def _open_text(path: Path) -> IO[str]:
    """Open for reading, gzip'd or plain, by the file's magic bytes rather than its name."""
    with open(path, "rb") as f:
        magic = f.read(2)
    raw: IO[bytes] = gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8")


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers; I/O and decompression errors become TraceError."""
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield lineno, line
    except FileNotFoundError:
        raise TraceError(f"{path}: no such trace file") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise _error(f"{path}, line {lineno + 1}", f"truncated or corrupt gzip ({exc})",
                     "the file was cut short or damaged; record or copy it again") from None
    except UnicodeDecodeError as exc:
        raise _error(f"{path}, line {lineno + 1}", f"not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _load_json(line: str, where: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise _error(where, f"not JSON ({exc.msg} at column {exc.colno})") from None


def read_trace(path: str | Path) -> Trace:
    """Read a whole trace into arrays, checking every line against the header."""
    path = Path(path)
    lines = _numbered_lines(path)
    first = next(lines, None)
    if first is None:
        raise TraceError(f"{path}: empty file, expected a {FORMAT!r} header on line 1")
    where = f"{path}, line {first[0]}"
    header = _parse_header(_load_json(first[1], where), where)
    rows = []
    for n, line in lines:
        where = f"{path}, line {n}"
        rows.append(_parse_record(_load_json(line, where), header, where))
    shape = (len(rows), header.num_layers, header.top_k)
    imputed = np.zeros(shape[:2], dtype=bool)
    for t, row in enumerate(rows):
        imputed[t, row[5]] = True
    trace = Trace(
        header=header,
        seq=np.array([r[0] for r in rows], dtype=np.int32),
        pos=np.array([r[1] for r in rows], dtype=np.int32),
        phase=np.array([r[2] for r in rows], dtype=np.int8),
        experts=np.array([r[3] for r in rows], dtype=np.int16 if header.num_experts < 2**15 else np.int32
                         ).reshape(shape),
        weights=np.array([r[4] for r in rows], dtype=np.float32).reshape(shape),
        imputed=imputed, path=str(path))
    log.debug("read %s: %d tokens x %d layers x top-%d", path, *shape)
    return trace


# -------------------------------------------------------------------------------------------- write


class TraceWriter:
    """Streams a trace to disk token by token (gzip'd when the name ends in .gz).

    Each record is checked with the reader's own rules before it is written, so the runtime can
    never produce a file that :func:`read_trace` rejects. The records go to a fresh ``PATH.partial-<pid>-<random>``,
    renamed to ``PATH`` when the ``with`` block ends normally; if it raises (an interrupted
    recording) the partial file is removed and an existing ``PATH`` is left as it was.
    """

    def __init__(self, path: str | Path, header: TraceHeader) -> None:
        self.path = Path(path)
        self.header = header
        self._file: IO[str] | None = None
        self._atomic: AbstractContextManager[Path] | None = None
        self._count = 0

    def __enter__(self) -> TraceWriter:
        self._atomic = atomic_output(self.path)
        tmp = self._atomic.__enter__()
        # mtime=0: the same records always give the same bytes
        raw: IO[bytes] = (gzip.GzipFile(tmp, "wb", compresslevel=6, mtime=0)
                          if self.path.suffix == ".gz" else open(tmp, "wb"))
        self._file = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
        self._file.write(json.dumps(self.header.to_json()) + "\n")
        return self

    def write(self, seq: int, pos: int, phase: str, experts: Any, weights: Any,
              imputed: Iterable[int] = ()) -> None:
        """Append one token; ``experts`` and ``weights`` are [layers, top_k] (lists or arrays)."""
        if self._file is None:
            raise TraceError(f"{self.path}: TraceWriter.write outside its 'with' block")
        obj: dict[str, Any] = {
            "seq": int(seq), "pos": int(pos), "phase": phase,
            "experts": np.asarray(experts).tolist(),
            "weights": [_f32_floats(row) for row in np.asarray(weights, dtype=np.float32)],
        }
        if imputed:
            obj["imputed"] = [int(layer) for layer in imputed]
        self._count += 1
        _parse_record(obj, self.header, f"{self.path}: record {self._count}")
        self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._file is not None:
            self._file.close()  # closes the gzip stream and the file beneath it
            self._file = None
        if self._atomic is not None:
            atomic, self._atomic = self._atomic, None
            atomic.__exit__(exc_type, exc, tb)  # rename on success, remove the partial file on an error


def write_trace(path: str | Path, header: TraceHeader, records: Iterable[TraceRecord]) -> None:
    """Write a whole trace; ``write_trace(p, t.header, t.records())`` copies a read trace."""
    with TraceWriter(path, header) as w:
        for r in records:
            w.write(r.seq, r.pos, r.phase, r.experts, r.weights, r.imputed)
