"""cli/options.py: the shared options build the same validated RuntimeConfig for every command."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from cli.options import LOADING, RuntimeOptions, predictor_options, runtime_config, with_runtime_options
from offload.errors import ConfigError, PolicyError


def test_runtime_config_from_the_shared_options(tmp_path):
    trace = tmp_path / "t.jsonl.gz"
    trace.write_bytes(b"")
    config = runtime_config("cpu", "bf16", "25%", "ram", "lfu", "markov", 2, "4", trace, scheduler="expert-aware")
    assert (config.device, config.offload_to, config.policy, config.lookahead, config.scheduler) == \
        ("cpu", "ram", "lfu", 2, "expert-aware")
    assert config.predictor_options == {"trace": trace} and config.hybrid == "off"
    assert runtime_config(hybrid="always").hybrid == "always"
    with pytest.raises(PolicyError):
        runtime_config(policy="mru")


def test_predictor_file_goes_to_the_predictor_that_takes_one(tmp_path):
    weights = tmp_path / "p.safetensors"
    weights.write_bytes(b"")
    assert predictor_options("learned", weights) == {"weights": weights} and predictor_options("none", None) is None
    with pytest.raises(ConfigError, match="takes no --predictor-file"):
        predictor_options("pregate", weights)
    with pytest.raises(ConfigError, match="does not exist"):
        predictor_options("learned", tmp_path / "missing")


def test_with_runtime_options_adds_the_shared_options_and_hands_over_one_config():
    app, seen = typer.Typer(), {}

    @app.command()
    @with_runtime_options(LOADING, expert_budget="100%")
    def command(name: str, runtime: RuntimeOptions, n: int = 1) -> None:
        seen.update(name=name, n=n, config=runtime.config(batch_size=3), budget=runtime.expert_budget)

    result = CliRunner().invoke(app, ["x", "--n", "2", "--policy", "lfu", "--offload-to", "ram"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (seen["name"], seen["n"], seen["budget"]) == ("x", 2, "100%")
    assert (config.policy, config.offload_to, config.expert_budget, config.batch_size) == ("lfu", "ram", "100%", 3)
    # only the options asked for: --predictor belongs to commands that prefetch
    assert CliRunner().invoke(app, ["x", "--predictor", "markov"]).exit_code != 0
