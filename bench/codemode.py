"""Code Mode benchmark: tokens and round trips vs classic tool calling, sandbox overhead.

    python bench/codemode.py             # full run: 300 programs, 300 tool calls
    python bench/codemode.py --quick     # smoke run (seconds)

1. The site task of issue 12 on 50 real thermostat agents ("read every thermostat, and for
   those below 19 °C raise the target by 1 °C, then report the rooms changed"), solved twice
   by a scripted model against the real tools: classic tool calling (one call per model turn,
   every result back through the model) and Code Mode (one program through the `code` tool).
   Every prompt the model would be sent is rendered with the local model's chat template and
   counted with its tokenizer (SmolLM2-135M from the model cache; without it the token part
   is skipped and says why). Read = prompt tokens summed over model calls (no prefix cache);
   written = completion tokens. Also shown: classic with parallel tool calls (a turn may call
   many tools), for reference.
2. Sandbox overhead per program with a warm pool (a trivial program, start to result), p50 and
   p99, back to back and paced (50 ms between programs, so every worker has its next context
   ready, as between a chat model's turns; the target is judged on this one); baseline
   interleaved in the same run: a fresh in-process mini-racer context per program (no worker,
   no isolation). Also the worker's off-path context preparation and a cold start.
3. Tool-call overhead from inside the sandbox (N sequential calls to a trivial tool, minus the
   empty program) vs the same tool awaited directly in Python (`Tool.invoke`).

Targets: >= 90% fewer tokens than classic tool calling; sandbox overhead p50 < 10 ms.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gatewayd.codemode import CodeExecutor, Limits, code_tool
from gatewayd.codemode.process import WorkerProcess
from gatewayd.tools import Tool, tool_from_function
from tests.codemode.site import COLD_BELOW_C, PROGRAM, TASK, site

SYSTEM = "You run the heating of this building. Use the tools to act; answer briefly."
TOKEN_TARGET = 0.90
OVERHEAD_TARGET_MS = 10.0
PACED_GAP_S = 0.05


# ---- tokens ----------------------------------------------------------------------------------


class Counter:
    """The local model's tokenizer and chat template, from the model cache."""

    def __init__(self, tokenizer: Any, template: Any, source: str) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.source = source

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def prompt(self, messages: list[dict[str, str]]) -> int:
        return self.count(self.template.render(messages, add_generation_prompt=True))


def load_counter() -> Counter | str:
    """A Counter, or why there is none."""
    try:
        from tokenizers import Tokenizer

        from engine.generate.build import GENERATION_FILE, TOKENIZER_FILE, default_cache_dir
        from engine.generate.tokenizer import ChatTemplate
    except ImportError as exc:
        return f"the llm extra is not installed ({exc}): scripts/setup cpu,llm"
    cache = default_cache_dir() / "smollm2"
    built = cache / "onnx-fp32"
    if (built / TOKENIZER_FILE).is_file() and (built / GENERATION_FILE).is_file():
        meta = json.loads((built / GENERATION_FILE).read_text())
        template = ChatTemplate(meta["chat_template"])
        return Counter(Tokenizer.from_file(str(built / TOKENIZER_FILE)), template, str(built))
    ggufs = sorted(cache.glob("*.gguf"))
    if not ggufs:
        return (
            f"no SmolLM2 model in {cache}: build it with `python -m engine.generate.build "
            "smollm2` (downloads ~93 MB once)"
        )
    return _counter_from_gguf(ggufs[0])


def _counter_from_gguf(path: Path) -> Counter:
    """The tokenizer read from the GGUF's metadata alone (no tensor is dequantised)."""
    from gguf import GGUFReader

    from engine.generate.gguf_model import TokenizerData
    from engine.generate.tokenizer import ChatTemplate, build_tokenizer

    reader = GGUFReader(path)

    def field(key: str, default: Any = None) -> Any:
        found = reader.fields.get(key)
        return default if found is None else found.contents()

    data = TokenizerData(
        model=str(field("tokenizer.ggml.model")),
        pre=str(field("tokenizer.ggml.pre", "default")),
        tokens=list(field("tokenizer.ggml.tokens")),
        merges=list(field("tokenizer.ggml.merges", [])),
        token_types=[int(t) for t in field("tokenizer.ggml.token_type", [])],
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
        add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
        chat_template=field("tokenizer.chat_template"),
    )
    return Counter(build_tokenizer(data), ChatTemplate(data.chat_template or ""), str(path))


def tools_system_prompt(tools: list[Tool]) -> str:
    """The system message with the tools, in the common <tools> / <tool_call> convention
    (SmolLM2's template has no tools section of its own)."""
    specs = "\n".join(json.dumps(t.openai_spec(), ensure_ascii=False) for t in tools)
    return (
        f"{SYSTEM}\n\nYou may call these tools:\n<tools>\n{specs}\n</tools>\n"
        'To call a tool, reply with <tool_call>{"name": ..., "arguments": ...}</tool_call>; '
        "the result comes back as a tool message."
    )


def tool_calls_text(calls: list[tuple[str, dict[str, Any]]]) -> str:
    return "\n".join(
        "<tool_call>\n"
        + json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
        + "\n</tool_call>"
        for name, args in calls
    )


class Transcript:
    """The messages a model is sent, turn by turn, and what each call costs in tokens."""

    def __init__(self, counter: Counter, system: str) -> None:
        self.counter = counter
        self.messages = [{"role": "system", "content": system}, {"role": "user", "content": TASK}]
        self.read = 0
        self.written = 0
        self.round_trips = 0

    def model_turn(self, text: str) -> None:
        self.read += self.counter.prompt(self.messages)
        self.written += self.counter.count(text) + 1  # + <|im_end|>
        self.round_trips += 1
        self.messages.append({"role": "assistant", "content": text})

    def tool_results(self, results: list[Any]) -> None:
        for result in results:
            self.messages.append({"role": "tool", "content": json.dumps(result)})

    def row(self, name: str) -> dict[str, Any]:
        return {
            "approach": name,
            "round_trips": self.round_trips,
            "tokens_read": self.read,
            "tokens_written": self.written,
            "tokens_total": self.read + self.written,
            "final_context_tokens": self.counter.prompt(self.messages),
        }


def answer_text(rooms: list[str]) -> str:
    return f"Raised the target by 1 °C in {len(rooms)} rooms: {', '.join(rooms)}."


async def classic(counter: Counter, tools: dict[str, Tool], *, parallel: bool) -> dict[str, Any]:
    """The scripted model solving the task with classic tool calls on the real tools."""
    chat = Transcript(counter, tools_system_prompt(list(tools.values())))

    async def turn(calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        chat.model_turn(tool_calls_text(calls))
        results = [await tools[name].invoke(args) for name, args in calls]
        chat.tool_results(results)
        return results

    (ids,) = await turn([("thermostats_list", {})])
    read_calls = [("thermostat_read", {"agent_id": i}) for i in ids]
    readings = []
    for batch in [read_calls] if parallel else [[c] for c in read_calls]:
        readings += await turn(batch)
    cold = [(i, r) for i, r in zip(ids, readings, strict=True) if r["temperature_c"] < COLD_BELOW_C]
    set_calls = [
        ("thermostat_set_target", {"agent_id": i, "target_c": r["target_c"] + 1}) for i, r in cold
    ]
    for batch in [set_calls] if parallel else [[c] for c in set_calls]:
        await turn(batch)
    rooms = [r["room"] for _, r in cold]
    chat.model_turn(answer_text(rooms))
    return {**chat.row("classic, parallel calls" if parallel else "classic"), "rooms": rooms}


async def code_mode(counter: Counter, executor: CodeExecutor, tools: list[Tool]) -> dict[str, Any]:
    code = code_tool(executor, tools)
    chat = Transcript(counter, tools_system_prompt([code]))
    chat.model_turn(tool_calls_text([("code", {"code": PROGRAM})]))
    shown = await code.invoke({"code": PROGRAM})
    chat.tool_results([shown])
    rooms = shown["result"]
    chat.model_turn(answer_text(rooms))
    return {**chat.row("code mode"), "rooms": rooms}


async def token_comparison(executor: CodeExecutor) -> dict[str, Any]:
    counter = load_counter()
    if isinstance(counter, str):
        return {"skipped": counter}
    rows = []
    for approach in ("classic", "classic, parallel calls", "code mode"):
        with tempfile.TemporaryDirectory() as state:
            async with site(Path(state)) as the_site:
                by_name = {t.name: t for t in the_site.tools}
                if approach == "code mode":
                    row = await code_mode(counter, executor, the_site.tools)
                else:
                    row = await classic(counter, by_name, parallel="parallel" in approach)
                targets = await the_site.targets()
        row["targets_raised"] = sum(1 for t in targets.values() if t == 21.0)
        rows.append(row)
    classic_row, parallel_row, code_row = rows
    assert classic_row["rooms"] == code_row["rooms"] == parallel_row["rooms"]
    saved = 1 - code_row["tokens_total"] / classic_row["tokens_total"]
    return {
        "tokenizer": counter.source,
        "rows": rows,
        "rooms_changed": len(code_row["rooms"]),
        "token_reduction": round(saved, 4),
        "token_reduction_vs_parallel": round(
            1 - code_row["tokens_total"] / parallel_row["tokens_total"], 4
        ),
        "token_target_met": saved >= TOKEN_TARGET,
    }


# ---- overhead --------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sandbox_overhead(executor: CodeExecutor, programs: int) -> dict[str, Any]:
    """Start-to-result time of a trivial program, interleaved with the baseline (a fresh
    in-process mini-racer context per program) so both see the same machine load. Twice:
    back to back, and paced (a gap between programs, as a model's turn gives in a chat: the
    pool is warm, every worker has its next context prepared)."""
    from py_mini_racer import MiniRacer

    for _ in range(10):  # warm
        await executor.run("return 1")
    modes: dict[str, Any] = {}
    for mode, gap_s in (("back_to_back", 0.0), ("paced", PACED_GAP_S)):
        pooled, in_process = [], []
        for _ in range(programs):
            started = time.perf_counter()
            result = await executor.run("return 1")
            pooled.append((time.perf_counter() - started) * 1e3)
            assert result.ok and result.result == 1
            started = time.perf_counter()
            racer = MiniRacer()
            value = racer.eval("(function () { return 1 })()")
            racer.close()
            in_process.append((time.perf_counter() - started) * 1e3)
            assert value == 1
            if gap_s:
                await asyncio.sleep(gap_s)
        modes[mode] = {
            "pool_p50_ms": round(statistics.median(pooled), 2),
            "pool_p99_ms": round(pct(pooled, 0.99), 2),
            "in_process_fresh_context_p50_ms": round(statistics.median(in_process), 2),
            "in_process_fresh_context_p99_ms": round(pct(in_process, 0.99), 2),
        }
    return {
        "programs": programs,
        "paced_gap_ms": PACED_GAP_S * 1e3,
        **modes,
        "overhead_target_met": modes["paced"]["pool_p50_ms"] < OVERHEAD_TARGET_MS,
    }


async def context_and_cold_start(samples: int) -> dict[str, Any]:
    from gatewayd.codemode._worker import Worker

    class Quiet(Worker):
        def send(self, message: dict[str, Any]) -> None:
            pass

    worker = Quiet(asyncio.StreamReader(), -1)
    limits = Limits()
    worker._config = {
        "heap_bytes": limits.heap_bytes,
        "max_log_chars": limits.max_log_chars,
        "max_log_lines": limits.max_log_lines,
        "max_result_chars": limits.max_result_chars,
        "max_tool_input_chars": limits.max_tool_input_chars,
    }
    prepare = []
    for _ in range(samples):
        started = time.perf_counter()
        context = await worker._prepare()
        prepare.append((time.perf_counter() - started) * 1e3)
        await context.close()
    cold = []
    for _ in range(3):
        started = time.perf_counter()
        process = WorkerProcess(limits)
        await process.start()
        cold.append((time.perf_counter() - started) * 1e3)
        await process.close()
    return {
        "context_prepare_p50_ms": round(statistics.median(prepare), 2),
        "worker_cold_start_p50_ms": round(statistics.median(cold), 1),
    }


async def tool_call_overhead(executor: CodeExecutor, calls: int) -> dict[str, Any]:
    async def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    add_tool = tool_from_function(add)
    program = f"let s = 0; for (let i = 0; i < {calls}; i++) s += await codemode.add({{a: i, b: 1}}); return s"
    sandbox_runs, empty_runs = [], []
    for _ in range(3):
        started = time.perf_counter()
        result = await executor.run(program, [add_tool])
        sandbox_runs.append(time.perf_counter() - started)
        assert result.ok and result.result == sum(range(calls)) + calls, result.error
        started = time.perf_counter()
        await executor.run("let s = 0; return s", [add_tool])
        empty_runs.append(time.perf_counter() - started)
    per_call_us = (statistics.median(sandbox_runs) - statistics.median(empty_runs)) / calls * 1e6
    direct = []
    for _ in range(3):
        started = time.perf_counter()
        for i in range(calls):
            await add_tool.invoke({"a": i, "b": 1})
        direct.append((time.perf_counter() - started) / calls * 1e6)
    return {
        "calls": calls,
        "sandbox_us_per_call": round(per_call_us, 1),
        "direct_invoke_us_per_call": round(statistics.median(direct), 1),
    }


# ---- report ----------------------------------------------------------------------------------


def print_table(results: dict[str, Any]) -> None:
    tokens = results["tokens"]
    if "skipped" in tokens:
        print(f"tokens: skipped: {tokens['skipped']}")
    else:
        print(
            f"site task, {tokens['rooms_changed']} of 50 rooms changed; tokenizer {tokens['tokenizer']}"
        )
        print(
            f"{'approach':<26}{'round trips':>12}{'read':>10}{'written':>10}{'total':>10}{'context':>10}"
        )
        for row in tokens["rows"]:
            print(
                f"{row['approach']:<26}{row['round_trips']:>12}{row['tokens_read']:>10,}"
                f"{row['tokens_written']:>10,}{row['tokens_total']:>10,}{row['final_context_tokens']:>10,}"
            )
        print(
            f"code mode: {tokens['token_reduction']:.1%} fewer tokens than classic "
            f"(target >= {TOKEN_TARGET:.0%}: {'met' if tokens['token_target_met'] else 'NOT met'}); "
            f"{tokens['token_reduction_vs_parallel']:.1%} fewer than classic with parallel calls"
        )
    o = results["overhead"]
    for mode in ("back_to_back", "paced"):
        m = o[mode]
        print(
            f"sandbox per program, warm pool, {mode.replace('_', ' ')}: p50 {m['pool_p50_ms']} ms, "
            f"p99 {m['pool_p99_ms']} ms; baseline fresh in-process context: p50 "
            f"{m['in_process_fresh_context_p50_ms']} ms, p99 {m['in_process_fresh_context_p99_ms']} ms"
        )
    print(
        f"target p50 < {OVERHEAD_TARGET_MS:g} ms (paced, {o['paced_gap_ms']:g} ms between programs): "
        f"{'met' if o['overhead_target_met'] else 'NOT met'}"
    )
    c = results["startup"]
    print(
        f"context preparation (between runs, off the request path): p50 {c['context_prepare_p50_ms']} ms; "
        f"worker cold start: {c['worker_cold_start_p50_ms']} ms"
    )
    t = results["tool_calls"]
    print(
        f"tool call from the sandbox: {t['sandbox_us_per_call']} µs; direct Tool.invoke: "
        f"{t['direct_invoke_us_per_call']} µs ({t['calls']} sequential calls)"
    )


async def main_async(opts: argparse.Namespace) -> dict[str, Any]:
    programs, calls = (30, 50) if opts.quick else (300, 300)
    async with CodeExecutor(workers=2) as executor:
        tokens = await token_comparison(executor)
        overhead = await sandbox_overhead(executor, programs)
        tool_calls = await tool_call_overhead(executor, calls)
    startup = await context_and_cold_start(10 if opts.quick else 50)
    return {
        "bench": "codemode",
        "quick": opts.quick,
        "tokens": tokens,
        "overhead": overhead,
        "startup": startup,
        "tool_calls": tool_calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON line to this file")
    opts = parser.parse_args()
    results = asyncio.run(main_async(opts))
    print_table(results)
    line = json.dumps(results, ensure_ascii=False)
    print(line)
    if opts.json_out:
        opts.json_out.write_text(line + "\n")


if __name__ == "__main__":
    main()
