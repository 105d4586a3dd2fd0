"""`[generators.NAME]` -> model directory -> Generator: the config's defaults are the engine's,
a GGUF is converted once (again only when it changes), `gatewayd model build` prepares a
config's models, and sampling parameters reach the engine only as it can honour them."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from engine.generate import Generator
from gatewayd import cli
from gatewayd.config import GeneratorSection, load_config, parse_config
from gatewayd.generation import GenerationError
from gatewayd.generation.prepare import PrepareError, generator_options, model_dir
from gatewayd.generation.run import accepted_params, engine_arguments
from tests.engine.generate.tiny_llama import write_tiny_llama
from tests.gatewayd.daemon_process import REPO


def test_a_section_that_sets_nothing_gives_the_engines_defaults() -> None:
    defaults = {
        name: p.default
        for name, p in inspect.signature(Generator.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    options = generator_options(GeneratorSection(model="smollm2"))
    assert options == {key: defaults[key] for key in options}


def test_the_example_config_serves_smollm2() -> None:
    config = load_config(REPO / "config.example.toml")
    assert config.generators["smollm2"].model == "smollm2"
    assert config.api.enabled, "the endpoint is reachable with the example token"


def test_a_gguf_is_converted_once_and_again_when_it_changes(tmp_path: Path) -> None:
    gguf = write_tiny_llama(tmp_path / "tiny.gguf")
    section = parse_config({"generators": {"t": {"gguf": str(gguf)}}}).generators["t"]
    steps: list[str] = []
    first = model_dir("t", section, tmp_path / "state", steps.append)
    assert first == tmp_path / "state" / "generators" / "t" / "onnx-fp32"
    assert any(s.startswith("converting") for s in steps)
    steps.clear()
    assert model_dir("t", section, tmp_path / "state", steps.append) == first
    assert steps == [], "already converted: nothing to do"
    write_tiny_llama(gguf, seed=1)
    model_dir("t", section, tmp_path / "state", steps.append)
    assert any(s.startswith("converting") for s in steps), "a changed file is converted again"


def test_an_onnx_dir_that_is_no_model_is_refused(tmp_path: Path) -> None:
    section = GeneratorSection(onnx_dir=tmp_path)
    with pytest.raises(PrepareError, match=r"generators\.x: onnx_dir .* \(no generation\.json\)"):
        model_dir("x", section, tmp_path)


def test_model_build_prepares_a_configs_generators(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gguf = write_tiny_llama(tmp_path / "tiny.gguf")
    config = tmp_path / "gatewayd.toml"
    config.write_text(f'[gateway]\nstate_dir = "state"\n[generators.t]\ngguf = "{gguf}"\n')
    assert cli.main(["model", "build", "-c", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"t: {tmp_path / 'state' / 'generators' / 't' / 'onnx-fp32'}"
    assert "converting" in err and "converted in" in err
    assert cli.main(["model", "build", "-c", str(config), "nope"]) == 78
    assert "no [generators.nope]" in capsys.readouterr().err


def test_sampling_parameters_reach_the_engine_only_as_it_can_honour_them(tiny: Generator) -> None:
    accepted = accepted_params(tiny) or frozenset()
    arguments = engine_arguments(
        tiny, {"max_tokens": 5, "temperature": None, "stop": ["x"], "priority": 3, "top_k": 0}
    )
    assert arguments["max_tokens"] == 5 and arguments["stop"] == ("x",)
    assert "temperature" not in arguments, "None: the engine's default"
    assert ("priority" in arguments) == ("priority" in accepted), "a hint: dropped if unknown"
    with pytest.raises(GenerationError, match="unknown sampling parameter 'beam_width'"):
        engine_arguments(tiny, {"beam_width": 4})
    if "stop_token_ids" not in accepted:
        assert engine_arguments(tiny, {"stop_token_ids": []}) == {}, "neutral: dropped"
        with pytest.raises(GenerationError) as refused:
            engine_arguments(tiny, {"stop_token_ids": [5]})
        assert refused.value.param == "stop_token_ids"
