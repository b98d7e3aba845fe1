"""The CLI through typer's CliRunner: output on stdout, stats on stderr, one-line errors, exit codes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import offload
from cli.main import app
from tests.tiny_models import add_char_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tiny_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("cli") / "mixtral"
    shutil.copytree(tiny_dir("mixtral"), dst)
    return add_char_tokenizer(dst)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_run_streams_the_greedy_continuation(model_dir, tmp_path):
    stats_path = tmp_path / "stats.json"
    result = invoke("run", model_dir, "def f(x):", "--max-new-tokens", 12, "--device", "cpu", "--expert-budget", "25%",
                    "--policy", "lfu", "--stats-json", stats_path)
    assert result.exit_code == 0, result.output
    expected = offload.from_pretrained(model_dir, device="cpu").generate_text("def f(x):", max_new_tokens=12)
    assert result.stdout == "def f(x):" + expected + "\n"
    assert "hit rate" in result.stderr
    stats = json.loads(stats_path.read_text())
    assert stats["expert_slots"] == 3 and stats["total"]["accesses"] > 0
    assert stats["total"]["hits"] + stats["total"]["misses"] == stats["total"]["accesses"]


def test_seeded_sampling_is_reproducible_and_really_samples(model_dir):
    args = ("run", model_dir, "abc", "--max-new-tokens", 10, "--temperature", 1.5, "--top-p", 0.9)
    first, second = invoke(*args, "--seed", 7), invoke(*args, "--seed", 7)
    assert first.exit_code == 0 and first.stdout == second.stdout
    greedy = invoke("run", model_dir, "abc", "--max-new-tokens", 10).stdout
    others = {invoke(*args, "--seed", seed).stdout for seed in (1, 2, 3)}
    # Were the options ignored, every seed would print the greedy text.
    assert len(others | {first.stdout}) > 1 and (others | {first.stdout}) != {greedy}


def test_info_reports_sizes_and_fits(model_dir):
    result = invoke("info", model_dir)
    assert result.exit_code == 0, result.output
    for text in ("mixtral", "4 per MoE layer, top-2, 12 in all", "bytes per expert", "fits in RAM"):
        assert text in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("run", "{tmp}/missing", "x"), "no such model directory"),
        (("run", "{model}", "x", "--expert-budget", "0"), "expert budget '0' must be at least 1 slot"),
        (("run", "{model}", "x", "--expert-budget", "120%"), "over 100%"),
        (("run", "{model}", "x", "--expert-budget", "many"), "cannot parse expert budget"),
        (("run", "{model}", "x", "--policy", "random"), "unknown eviction policy 'random'"),
        (("run", "{model}", "x", "--offload-to", "tape"), "unknown --offload-to 'tape'"),
        (("run", "{model}", "x", "--dtype", "int3"), "unknown dtype 'int3'"),
        (("run", "{model}", "x", "--max-new-tokens", "-2"), "--max-new-tokens must be >= 0"),
        (("run", "{model}", "x", "--max-new-tokens", "ten"), "Invalid value for '--max-new-tokens'"),
        (("run", "{model}"), "give either a PROMPT or --prompts-file"),
        (("run", "{model}", "x", "--predictor", "oracle"), "unknown predictor 'oracle'"),
        (("run", "{model}", "x", "--predictor", "pregate", "--predictor-file", "{model}/config.json"),
         "--predictor pregate takes no --predictor-file"),
        (("run", "{model}", "x", "--predictor", "learned", "--predictor-file", "{tmp}/p.safetensors"),
         "p.safetensors does not exist"),
        (("run", "{model}", "x", "--predictor", "learned", "--predictor-file", "{model}/config.json"),
         "not a learned-predictor safetensors file"),
        (("info", "{tmp}"), "no config.json"),
        (("run", "{model}", "x", "--quant-activations", "bfloat16"), "unknown --quant-activations 'bfloat16'"),
        (("run", "{model}", "x", "--threads", "-1"), "invalid --threads -1"),
    ],
)
def test_errors_are_one_line(model_dir, tmp_path, args, message):
    result = invoke(*(a.format(tmp=tmp_path, model=model_dir) for a in args))
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_threads_and_activation_modes_keep_the_tokens(model_dir):
    # float experts: --quant-activations changes nothing; --threads splits rows, never a row's sum
    plain = invoke("run", model_dir, "def g(y):", "--max-new-tokens", 8)
    for extra in (("--threads", "1"), ("--threads", "3"), ("--quant-activations", "int16")):
        other = invoke("run", model_dir, "def g(y):", "--max-new-tokens", 8, *extra)
        assert other.exit_code == 0, other.output
        assert other.stdout == plain.stdout, extra


def test_markov_fits_the_trace_given_and_keeps_the_tokens(model_dir, tmp_path):
    prompts, trace = tmp_path / "prompts.txt", tmp_path / "t.jsonl.gz"
    prompts.write_text("def f(x):\n")
    assert invoke("trace", model_dir, "--prompts", prompts, "--out", trace, "--max-new-tokens", 8).exit_code == 0
    plain = invoke("run", model_dir, "def g(y):", "--max-new-tokens", 8, "--expert-budget", 2)
    markov = invoke("run", model_dir, "def g(y):", "--max-new-tokens", 8, "--expert-budget", 2,
                    "--predictor", "markov", "--predictor-file", trace)
    assert markov.exit_code == 0, markov.output
    assert markov.stdout == plain.stdout and "predictor markov" in markov.stderr


def test_cuda_absent_is_one_line(model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = invoke("run", model_dir, "x", "--device", "cuda")
    assert result.exit_code == 1 and result.stderr.startswith("Error: device 'cuda'")


def test_corrupt_checkpoint_through_cli(model_dir, tmp_path):
    dst = tmp_path / "bad"
    shutil.copytree(model_dir, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    result = invoke("run", dst, "x")
    assert result.exit_code == 1 and "model.safetensors is truncated" in result.stderr


def test_trace_command_writes_a_readable_trace(model_dir, tmp_path):
    from offload.traces.format import read_trace

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\nreturn x\n")
    out = tmp_path / "t.jsonl.gz"
    result = invoke("trace", model_dir, "--prompts", prompts, "--out", out, "--max-new-tokens", 3, "--device", "cpu")
    assert result.exit_code == 0, result.output
    trace = read_trace(out)
    assert len(trace) == (9 + 2) + (8 + 2)  # prompt tokens + fed-back generated tokens, per prompt
    assert trace.header.extra["workload"] == "prompts"
    bad = invoke("trace", model_dir, "--prompts", tmp_path / "none.txt", "--out", out)
    assert bad.exit_code == 1 and bad.stderr.startswith("Error: prompts file")


def test_perplexity_prints_one_line_and_writes_json(model_dir, tmp_path):
    text, out = tmp_path / "t.txt", tmp_path / "p.json"
    text.write_text("def f(x):\n    return x + 1\n" * 4)
    result = invoke("perplexity", model_dir, "--text", text, "--context", 16, "--stride", 8, "--json", out,
                    "--expert-budget", 2)
    assert result.exit_code == 0, result.output
    ppl = json.loads(out.read_text())
    assert result.stdout == f"perplexity {ppl['perplexity']:.4f} over {ppl['tokens']} tokens\n"
    assert ppl["tokens"] == len(text.read_text()) - 1 and ppl["context"] == 16  # one token per character
    missing = invoke("perplexity", model_dir, "--text", tmp_path / "none.txt")
    assert missing.exit_code == 1 and missing.stderr.startswith("Error: --text")


def test_run_defaults_to_the_auto_budget_and_says_what_it_chose(model_dir):
    result = invoke("run", model_dir, "abc", "--max-new-tokens", 4, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "expert budget auto: 12 of 12 experts fit this machine" in result.stderr


def test_a_budget_that_does_not_fit_is_one_line_saying_what_does(model_dir, monkeypatch):
    from collections import namedtuple

    import offload.hw.machine

    free = 512 * 2**20 + 600_000            # over the 512 MiB headroom floor: dense, KV and a few experts
    monkeypatch.setattr(offload.hw.machine.psutil, "virtual_memory", lambda: namedtuple("VM", "total available")(
        2**34, free))
    result = invoke("run", model_dir, "abc", "--max-new-tokens", 4, "--device", "cpu", "--expert-budget", "100%",
                    "--offload-to", "ram")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: expert budget '100%' (12 slots")
    assert "does not fit" in lines[0] and "fits, as does --expert-budget auto" in lines[0]


def test_run_chat_renders_the_prompt_through_the_template(model_dir):
    from offload.serve.chat import encode_chat, resolve_chat_template

    m = offload.from_pretrained(model_dir, device="cpu")
    ids = encode_chat(m.tokenizer, resolve_chat_template(model_dir).render([{"role": "user", "content": "hi"}]))
    out = m.generate(torch.tensor([ids]), max_new_tokens=10)
    expected = m.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
    result = invoke("run", model_dir, "hi", "--chat", "--max-new-tokens", 10, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"   # the reply only, not the rendered conversation


# -- what a new user hits, and what an interrupt does ------------------------------------------------------------


def test_version_and_help_answer_without_importing_torch():
    import subprocess
    import sys

    from offload.version import __version__
    from tests.paths import ROOT

    version = invoke("--version")
    assert (version.exit_code, version.stdout) == (0, f"offload {__version__}\n")
    # -X importtime lists every module the interpreter imports: --help must not need torch (it took ~8 s)
    for args in (["--help"], ["run", "--help"], ["serve", "--help"]):
        out = subprocess.run([sys.executable, "-X", "importtime", "-m", "cli.main", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "Usage" in out.stdout
        imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
        assert "torch" not in imported and "offload.runtime.load" not in imported, args


@pytest.mark.parametrize("command", ["run", "trace"])
def test_ctrl_c_exits_130_and_says_so(model_dir, tmp_path, monkeypatch, command):
    from offload.model.forward import MoEModel

    real, calls = MoEModel.forward, [0]

    def forward(self, *args, **kwargs):                  # Ctrl-C lands in the third forward pass
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MoEModel, "forward", forward)
    (tmp_path / "p.txt").write_text("def f(x):\n")
    args = {"run": ("run", model_dir, "abc", "--max-new-tokens", 8, "--stats-json", tmp_path / "s.json"),
            "trace": ("trace", model_dir, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "t.jsonl")}[command]
    result = invoke(*args)
    assert (result.exit_code, result.stderr.splitlines()[-1]) == (130, "Error: interrupted"), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]   # no partial output left behind


def test_run_reads_the_prompt_from_stdin(model_dir):
    given = invoke("run", model_dir, "def f(x):", "--max-new-tokens", 6)
    piped = runner.invoke(app, ["run", str(model_dir), "-", "--max-new-tokens", "6"], input="def f(x):\n")
    assert piped.exit_code == 0 and piped.stdout == given.stdout
    binary = runner.invoke(app, ["run", str(model_dir), "-"], input=b"\xff\xfeab")
    assert (binary.exit_code, binary.stderr) == (1, "Error: the prompt on stdin is not UTF-8 text (byte 0) "
                                                    "(hint: pipe in UTF-8 text)\n")


def test_a_prompt_too_long_for_the_model_is_one_line_before_its_memory(model_dir):
    from tests.rss import peak_rss

    with peak_rss() as rise:                              # the forward over it once tried a 10 GB mask
        result = invoke("run", model_dir, "x" * 100_000, "--max-new-tokens", 4)
    assert result.exit_code == 1 and result.stdout == "" and "Traceback" not in result.output, result.output
    assert result.stderr.splitlines()[-1].startswith("Error: the prompt's 100000 tokens + max_new_tokens 4 exceed "
                                                     "the model's 256 positions")
    assert rise[0] < 1024, f"RSS rose {rise[0]:.0f} MiB"


def test_files_the_cli_cannot_use_are_one_line(model_dir, tmp_path):
    (tmp_path / "p.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    binary = invoke("run", model_dir, "--prompts-file", tmp_path / "p.txt")
    assert binary.exit_code == 1 and binary.stderr.startswith(f"Error: prompts file {tmp_path / 'p.txt'} is not UTF-8")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    gguf = invoke("run", tmp_path / "m.gguf", "x")
    assert gguf.exit_code == 1 and gguf.stderr.startswith(f"Error: {tmp_path / 'm.gguf'} is not a readable GGUF file")


def test_a_predictor_that_can_never_prefetch_is_said_once(caplog):
    result = invoke("run", "tiny-moe", "def f(x):", "--max-new-tokens", 4, "--expert-budget", 2,
                    "--predictor", "learned", "--device", "cpu")
    assert result.exit_code == 0, result.output
    said = [r for r in caplog.records if "prefetching is off for --predictor learned" in r.getMessage()]
    assert len(said) == 1 and "2 slots are all needed by one layer's top-2 experts" in said[0].getMessage()
    with offload.from_pretrained("tiny-moe", device="cpu", expert_budget=3, predictor="learned") as m:
        assert m.model.prefetcher is not None             # one slot beyond the top-2: it prefetches
