"""offload/trace.py: the HumanEval trace reads as documented, records round-trip, bad files fail clearly."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from offload.errors import TraceError
from offload.traces.format import FORMAT, TraceHeader, TraceRecord, TraceWriter, read_trace, write_trace

HUMANEVAL = Path(__file__).parents[2] / "data" / "mixtral-8x7b-humaneval.jsonl.gz"
HEADER = TraceHeader("tiny-moe", num_layers=2, num_experts=4, top_k=2, extra={"workload": "unit", "n": [1, 2]})
RECORDS = [
    TraceRecord(0, 0, "prefill", ((0, 1), (3, 2)), ((0.75, 0.25), (0.5, 0.5)), imputed=(1,)),
    TraceRecord(0, 1, "decode", ((2, 0), (1, 3)), ((0.695958, 0.304042), (1.0, 0.0))),
    TraceRecord(1, 0, "decode", ((3, 1), (0, 2)), ((0.6, 0.4), (0.9, 0.1))),
]


@pytest.fixture(scope="module")
def humaneval():
    return read_trace(HUMANEVAL)


def test_humaneval_trace_reads_as_its_readme_says(humaneval) -> None:
    h = humaneval.header
    assert (h.model, h.num_layers, h.num_experts, h.top_k) == ("mistralai/Mixtral-8x7B-Instruct-v0.1", 32, 8, 2)
    assert len(humaneval) == 338 and humaneval.num_accesses == 21632
    assert humaneval.experts.shape == (338, 32, 2) and humaneval.experts.dtype == np.int16
    assert humaneval.weights.dtype == np.float32
    assert np.bincount(humaneval.seq).tolist() == [83, 255]
    assert humaneval.pos[:3].tolist() == [0, 1, 2] and set(humaneval.phase.tolist()) == {1}  # all decode
    assert humaneval.experts[0, 0].tolist() == [6, 5]  # first token, layer 0, top-1 first
    assert int(humaneval.imputed.sum()) == h.extra["imputed_slots"] == 37
    assert np.all(humaneval.weights[humaneval.imputed] == 0.5)
    assert h.extra["workload"] == "humaneval" and len(h.extra["sequences"]) == 2


@pytest.mark.parametrize("name", ["t.jsonl.gz", "t.jsonl"])
def test_records_round_trip(tmp_path: Path, name: str) -> None:
    write_trace(tmp_path / name, HEADER, RECORDS)
    back = read_trace(tmp_path / name)
    assert back.header == HEADER
    assert list(back.records()) == RECORDS
    assert ((tmp_path / name).read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")  # plain stays plain


def test_humaneval_rewrites_to_identical_lines(tmp_path: Path, humaneval) -> None:
    write_trace(tmp_path / "copy.jsonl.gz", humaneval.header, humaneval.records())
    assert gzip.open(tmp_path / "copy.jsonl.gz").read() == gzip.open(HUMANEVAL).read()


def test_writer_streams_token_by_token_from_arrays(tmp_path: Path) -> None:
    path = tmp_path / "stream.jsonl.gz"
    experts = np.array([[[0, 1], [3, 2]], [[2, 0], [1, 3]]], dtype=np.int64)  # [tokens, layers, top_k]
    weights = np.full((2, 2, 2), 0.5, dtype=np.float32)
    with TraceWriter(path, HEADER) as w:
        for t in range(2):
            w.write(0, t, "decode", experts[t], weights[t])
    back = read_trace(path)
    assert np.array_equal(back.experts, experts) and np.array_equal(back.weights, weights)
    assert back.pos.tolist() == [0, 1] and not back.imputed.any()


def test_writer_refuses_what_the_reader_would_reject(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "bad.jsonl", HEADER) as w, pytest.raises(TraceError, match="expert id 4"):
        w.write(0, 0, "decode", [[0, 1], [2, 4]], [[0.5, 0.5], [0.5, 0.5]])


def test_header_checks_its_shape() -> None:
    with pytest.raises(TraceError, match="top_k"):
        TraceHeader("m", num_layers=2, num_experts=4, top_k=5)
    with pytest.raises(TraceError, match="shadow"):
        TraceHeader("m", 2, 4, 2, extra={"top_k": 3})


def _lines(header: dict | None = None, *records: dict) -> str:
    head = {"format": FORMAT, "model": "m", "num_layers": 2, "num_experts": 4, "top_k": 2} | (header or {})
    return "\n".join(json.dumps(x) for x in (head, *records)) + "\n"


GOOD = {"seq": 0, "pos": 0, "phase": "decode", "experts": [[0, 1], [2, 3]], "weights": [[0.6, 0.4], [0.7, 0.3]]}

MALFORMED = {
    "empty file": (b"", "empty file"),
    "empty gzip": (gzip.compress(b""), "empty file"),
    "header not JSON": (b"format: trace\n", "line 1: not JSON"),
    "wrong format": (_lines({"format": "offload-routing-trace/0"}).encode(), "line 1: format is"),
    "header lacks top_k": (json.dumps({"format": FORMAT, "model": "m", "num_layers": 2, "num_experts": 4}).encode(),
                           "line 1: header lacks top_k"),
    "header top_k over experts": (_lines({"top_k": 5}).encode(), "line 1: top_k must be in 1..num_experts=4, got 5"),
    "header layers not int": (_lines({"num_layers": "2"}).encode(),
                              "line 1: num_layers, num_experts and top_k must be integers"),
    "record not JSON": ((_lines(None, GOOD) + "{oops\n").encode(), "line 3: not JSON"),
    "wrong layers": (_lines(None, GOOD, GOOD | {"experts": [[0, 1]]}).encode(),
                     "line 3: 'experts' has 1 layers, header says num_layers=2"),
    "wrong top_k": (_lines(None, GOOD | {"weights": [[1.0], [1.0]]}).encode(),
                    "line 2: 'weights' layer 0 has 1 entries, header says top_k=2"),
    "expert out of range": (_lines(None, GOOD, GOOD, GOOD | {"experts": [[0, 1], [2, 8]]}).encode(),
                            "line 4: expert id 8 at layer 1 out of range 0..3"),
    "repeated expert": (_lines(None, GOOD | {"experts": [[1, 1], [2, 3]]}).encode(), "line 2: expert ids repeat"),
    "bad phase": (_lines(None, GOOD | {"phase": "train"}).encode(), "line 2: phase is 'train'"),
    "missing field": (_lines(None, {k: v for k, v in GOOD.items() if k != "pos"}).encode(), "line 2: record lacks pos"),
    "nan weight": (_lines(None, GOOD | {"weights": [[0.5, float("nan")], [0.5, 0.5]]}).encode(),
                   "line 2: 'weights' layer 0 has a bad entry"),
    "not gzip past magic": (b"\x1f\x8b" + b"garbage" * 10, "line 1: truncated or corrupt gzip"),
}


@pytest.mark.parametrize("content, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_file_gives_one_line_error_naming_file_and_line(tmp_path: Path, content: bytes,
                                                                  message: str) -> None:
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(content)
    with pytest.raises(TraceError) as err:
        read_trace(path)
    text = str(err.value)
    assert text.startswith(f"{path}") and message in text and "\n" not in text


def test_truncated_gzip_names_the_line_where_it_stopped(tmp_path: Path) -> None:
    data = HUMANEVAL.read_bytes()
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match=r"cut\.jsonl\.gz, line \d+: truncated or corrupt gzip") as err:
        read_trace(path)
    assert int(str(err.value).split("line ")[1].split(":")[0]) > 100  # about half of 339 lines came through


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such trace file"):
        read_trace(tmp_path / "nope.jsonl.gz")
