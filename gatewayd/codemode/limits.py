"""What one Code Mode program may use, and the error a program gets past a limit."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Bounds for one program run. The defaults suit a chat agent's program on a gateway."""

    wall_time_s: float = 30.0  # start to result, tool calls included
    cpu_time_s: float = 10.0  # the worker process's CPU time (tools run on the host)
    heap_bytes: int = 64 * MiB  # V8's hard heap limit
    memory_bytes: int = 256 * MiB  # array buffers, wasm memory: everything outside the heap
    max_code_chars: int = 100_000
    max_result_chars: int = 100_000  # the program's return value, as JSON
    max_tool_input_chars: int = 100_000  # one tool call's input, as JSON, out of the sandbox
    max_tool_result_chars: int = 1_000_000  # one tool's result, as JSON, into the sandbox
    max_log_lines: int = 200
    max_log_chars: int = 20_000
    max_tool_calls: int = 1_000  # per run
    max_concurrent_tool_calls: int = 8

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"codemode Limits.{name} must be positive, got {value!r}")


class CodeModeError(Exception):
    """Code Mode cannot run programs (mini-racer missing, a worker that does not start)."""
