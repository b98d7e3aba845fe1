"""offload/tools/profile.py: patterns from routing traces (hand-computed), from the model's own routing, and the
refusals of bad sources."""

from __future__ import annotations

import numpy as np
import pytest

import offload
from offload.errors import ConfigError
from offload.memory.patterns import GENERIC, ModelIdentity
from offload.tools.profile import model_identity, parse_sources, profile, texts_of
from offload.traces.format import TraceHeader, TraceWriter
from tests.offload.memory.test_patterns import EXPERTS, WEIGHTS


def write_trace(path, experts, weights, model="tiny", moe_layers=(0, 2)):
    header = TraceHeader(model, experts.shape[1], 4, experts.shape[2], extra={"moe_layers": list(moe_layers)})
    with TraceWriter(path, header) as w:
        for t, (e, wt) in enumerate(zip(experts, weights)):
            w.write(0, t, "prefill", e, wt)
    return path


def test_patterns_of_traces_by_hand(tmp_path):
    code = write_trace(tmp_path / "code.jsonl.gz", EXPERTS[:2], WEIGHTS[:2])
    prose = write_trace(tmp_path / "prose.jsonl", EXPERTS[2:], WEIGHTS[2:])
    p = profile(None, {}, {"code": [code], "prose": [prose]}, threshold=0.0, ident="tiny")
    assert p.model == ModelIdentity("tiny", "", (0, 2), 4, 2) and list(p.tasks) == ["code", "prose", GENERIC]
    # code's two tokens: layer 0 e0 (0.6 + 0.9) / 2, e1 0.4 / 2, e2 0.1 / 2; layer 1 e2 (0.75 + 0.5) / 2, ...
    np.testing.assert_allclose(p.tasks["code"].importance, [[0.75, 0.2, 0.05, 0], [0.25, 0, 0.625, 0.125]])
    assert p.tasks["code"].tokens == 2 and p.tasks["prose"].tokens == 1 and p.tasks[GENERIC].tokens == 3
    np.testing.assert_allclose(p.tasks[GENERIC].importance.sum(1), 1)
    assert p.tasks["code"].sources == (str(code),)


def test_a_trace_of_another_model_is_refused(tmp_path):
    other = write_trace(tmp_path / "other.jsonl", EXPERTS, WEIGHTS, model="big")
    with pytest.raises(ConfigError, match="other.jsonl was recorded on 'big'.*not on 'tiny'"):
        profile(None, {}, {"code": [other]}, ident="tiny")
    mine = write_trace(tmp_path / "mine.jsonl", EXPERTS, WEIGHTS, model="tiny-moe")
    with pytest.raises(ConfigError, match="not on 'tiny-moe' \\(5 MoE layers x 8 experts"):  # the real shape
        profile(None, {}, {"code": [mine]}, ident=model_identity("tiny-moe"))


def test_patterns_of_the_model_s_own_routing(tmp_path):
    m = offload.from_pretrained("tiny-moe")
    text = tmp_path / "code.py"
    text.write_text("def add(a, b):\n    return a + b\n" * 6)
    p = profile(m, {"code": [text]}, {}, context=32)
    tokens = len(m.encode(text.read_text())[0])
    assert p.model.name == "tiny-moe" and p.model.architecture == "MixtralForCausalLM"
    assert p.tasks["code"].tokens == tokens and p.tasks["code"].frequency.sum(1) == pytest.approx([2] * 5)


def test_sources_and_texts(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n"y"\n')
    (tmp_path / "b.txt").write_text("line one\nline two\n")
    found = parse_sources([f"code={tmp_path / 'a.jsonl'}", f"code={tmp_path / 'b.txt'}"], "--task")
    assert list(found) == ["code"] and len(found["code"]) == 2
    assert texts_of(tmp_path / "a.jsonl") == ["x", "y"] and texts_of(tmp_path / "b.txt") == ["line one\nline two\n"]
    for item, message in [("code", "not NAME=FILE"), (f"generic={tmp_path / 'b.txt'}", "pooled pattern"),
                          ("code=missing.txt", "does not exist")]:
        with pytest.raises(ConfigError, match=message):
            parse_sources([item], "--task")
    with pytest.raises(ConfigError, match="nothing to profile"):
        profile(None, {}, {})
    with pytest.raises(ConfigError, match="--threshold"):
        profile(None, {}, {"code": [tmp_path / "a.jsonl"]}, threshold=1.0)
