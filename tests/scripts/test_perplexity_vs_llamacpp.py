"""scripts/perplexity_vs_llamacpp.py's own logic, without llama.cpp: llama.cpp's side of the score (window_nll in
llamacpp_worker.py) against torch's cross-entropy, offload's side against offload.tools.perplexity, the table, and
one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from offload.tools.perplexity import windows
from tests.scripts import load_script

ppl = load_script("perplexity_vs_llamacpp")
worker = load_script("llamacpp_worker")


@pytest.mark.parametrize("context, stride", [(16, 16), (16, 5)])
def test_llama_side_scores_each_token_once_as_cross_entropy_does(context, stride):
    """Summed over offload's windows, window_nll equals torch's cross-entropy of each scored token from the logits
    of the position before it, i.e. the same NLL offload.tools.perplexity sums (float64 against float32: 1e-4)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (40,), generator=g).tolist()
    logits = torch.randn(40, 50, generator=g) * 3  # one row per position, as llama.cpp's scores with logits_all
    ours = sum(worker.window_nll(logits[b:e].numpy(), ids[b:e], n) for b, e, n in windows(len(ids), context, stride))
    want, scored = 0.0, []
    for _begin, end, count in windows(len(ids), context, stride):
        want += float(F.cross_entropy(logits[end - count - 1 : end - 1], torch.tensor(ids[end - count : end]),
                                      reduction="sum"))
        scored += range(end - count, end)
    assert len(scored) == len(set(scored)) > len(ids) // 2  # each token at most once
    assert ours == pytest.approx(want, rel=1e-5)


def test_window_nll_is_stable_for_large_logits():
    logits = np.array([[1000.0, 0.0], [0.0, 1000.0], [5.0, 5.0]])
    assert worker.window_nll(logits, [0, 1, 0], 2) == pytest.approx(2000.0)  # two 1000-nat misses, no overflow


def test_table_marks_the_target():
    row = {"gguf": "/x/m-q4_0.gguf", "offload": {"perplexity": 10.05, "tokens": 100, "expert_format": "gguf (Q4_0)"},
           "llama.cpp": {"perplexity": 10.0}, "relative_gap": 0.005, "within_target": True}
    far = {**row, "relative_gap": -0.02, "within_target": False}
    text = ppl.table([row, far])
    assert "| m-q4_0.gguf (gguf (Q4_0)) | 100 | 10.05 | 10 | +0.50% | within 1%: met |" in text
    assert "-2.00% | within 1%: missed |" in text


def test_bad_input_is_one_line(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(ppl.app, [str(tmp_path / "nope.gguf")])
    assert missing.exit_code != 0 and "no such GGUF file" in missing.output and "Traceback" not in missing.output
    none = runner.invoke(ppl.app, [])
    assert none.exit_code != 0 and "Traceback" not in none.output


def test_default_text_is_standard_library_source():
    text = ppl.default_text(2000)
    assert len(text) == 2000 and "import" in text
