"""`[generators.NAME]` -> a model directory (fetched and converted once) -> a `Generator`.

    generator = build_generator("smollm2", section, state_dir, progress=print)

Preparation is idempotent and cheap once done: a built-in recipe (`model = "smollm2"`) is
checked in the model cache, a GGUF file is converted again only when its sha256 changed, and
`onnx_dir` is used as it is. Every failure is a `PrepareError` whose message names the
section and says what to do.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gatewayd.config import GeneratorSection

if TYPE_CHECKING:
    from engine.generate import Generator

Progress = Callable[[str], None]

LLM_EXTRA_HINT = "install the llm extra: .venv/bin/pip install -e '.[cpu,llm]'"


class PrepareError(Exception):
    """A generator's model cannot be prepared or loaded; the message says which and why."""


def _silent(_: str) -> None:
    pass


def generator_options(section: GeneratorSection) -> dict[str, Any]:
    """The `Generator(...)` keyword arguments a section sets (every one, defaults included)."""
    return {
        "max_batch": section.max_batch,
        "prefill_tokens": section.prefill_tokens,
        "kv_cache_tokens": section.kv_cache_tokens,
        "block_size": section.block_size,
        "prefix_cache": section.prefix_cache,
        "intra_op_threads": section.cpu_threads,
    }


def known_models() -> list[str]:
    """The built-in recipes (`model = "..."`); empty without the llm extra."""
    try:
        from engine.generate.build import KNOWN_MODELS
    except ImportError:
        return []
    return sorted(KNOWN_MODELS)


def check_section(name: str, section: GeneratorSection) -> None:
    """Checks that need no download: the recipe exists, onnx_dir is a model directory.
    Raises ValueError (check-config reports it under `generators`)."""
    if section.model is not None:
        known = known_models()
        if known and section.model not in known:
            raise ValueError(
                f"{name}: unknown model {section.model!r} (built-in: {', '.join(known)}); "
                "for another model give gguf = PATH"
            )
    if section.onnx_dir is not None and not (section.onnx_dir / "generation.json").is_file():
        raise ValueError(
            f"{name}: onnx_dir {section.onnx_dir} is not a converted model directory (no "
            "generation.json); convert a GGUF with: gatewayd model build -c CONFIG, or "
            "python -m engine.generate.build FILE.gguf --out DIR"
        )


def model_dir(
    name: str, section: GeneratorSection, state_dir: Path, progress: Progress = _silent
) -> Path:
    """The converted model directory of `[generators.NAME]`, fetching/converting if needed."""
    if section.onnx_dir is not None:
        try:
            check_section(name, section)
        except ValueError as err:
            raise PrepareError(f"generators.{err}") from None
        return section.onnx_dir
    try:
        from engine.generate import GenerateError
        from engine.generate.build import convert, ensure_model, is_built, sha256_file
    except ImportError as err:
        raise PrepareError(
            f"generators.{name}: the model converter is not installed ({err}); {LLM_EXTRA_HINT}"
        ) from None
    try:
        if section.model is not None:
            check_section(name, section)
            return ensure_model(
                section.model, cache_dir=section.cache_dir, progress=progress,
                weights=section.weights,
            )  # fmt: skip
        assert section.gguf is not None
        target = (section.cache_dir or state_dir / "generators" / name) / f"onnx-{section.weights}"
        if not is_built(target, sha256_file(section.gguf), section.weights):
            progress(f"converting {section.gguf} into {target}")
            convert(section.gguf, target, progress, weights=section.weights)
        return target
    except (GenerateError, OSError, ValueError) as err:
        raise PrepareError(f"generators.{name}: cannot prepare the model: {err}") from None


def build_generator(
    name: str, section: GeneratorSection, state_dir: Path, progress: Progress = _silent
) -> Generator:
    """Prepare the model of `[generators.NAME]` and load it (blocking: run it off the loop)."""
    directory = model_dir(name, section, state_dir, progress)
    try:
        from engine.generate import GenerateError, Generator
    except ImportError as err:
        raise PrepareError(f"generators.{name}: {err}; {LLM_EXTRA_HINT}") from None
    try:
        return Generator(directory, **generator_options(section))
    except (GenerateError, OSError, ValueError) as err:
        raise PrepareError(f"generators.{name}: cannot load {directory}: {err}") from None
    except Exception as err:  # onnxruntime's own errors (a corrupt decoder.onnx)
        raise PrepareError(
            f"generators.{name}: cannot load {directory}: {type(err).__name__}: {err}"
        ) from None


async def start_generator(
    name: str, section: GeneratorSection, state_dir: Path, progress: Progress = _silent
) -> Generator:
    """`build_generator` on a daemon thread of its own: the event loop keeps turning (and a
    stop signal during a first-start download ends the process without waiting for it)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Generator] = loop.create_future()

    def settle(result: Generator | None, error: BaseException | None) -> None:
        if future.done():  # start-up was abandoned meanwhile
            if result is not None:
                result.close()
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        made: Generator | None = None
        error: BaseException | None = None
        try:
            made = build_generator(name, section, state_dir, progress)
        except BaseException as err:
            error = err
        try:
            loop.call_soon_threadsafe(settle, made, error)
        except RuntimeError:  # the loop is gone: nobody will use it
            if made is not None:
                made.close()

    threading.Thread(target=work, name=f"prepare-{name}", daemon=True).start()
    return await future
