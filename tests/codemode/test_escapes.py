"""Escape and abuse: each attempt is contained with a clear error, the worker that ran it is
killed and replaced, and the host (this event loop, the executor) carries on unaffected."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from gatewayd.codemode import CodeExecutor, Limits, RunResult
from tests.codemode.conftest import ESCAPE_LIMITS, Calls, shared_executor
from tests.processes import running
from tests.waiting import wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

WAIT_S = 20.0


async def contained(executor: CodeExecutor, result: RunResult, limit: str, says: str) -> None:
    """`result` stopped at `limit` with an error containing `says`; its worker is gone, and
    the executor runs the next program on another, healthy worker."""
    assert not result.ok
    assert result.limit == limit, (result.limit, result.error)
    assert result.error is not None and says in result.error, result.error
    assert result.worker_pid is not None
    pid = result.worker_pid
    await wait_until(lambda: not running(pid), WAIT_S, f"worker {pid} to be killed")
    after = await executor.run("return 1 + 1")
    assert after.ok and after.result == 2
    assert after.worker_pid != pid


async def test_an_infinite_loop_is_stopped_while_the_host_keeps_running(
    strict_executor: CodeExecutor,
) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    replaced = strict_executor.replaced
    try:
        result = await strict_executor.run("while (true) {}")
    finally:
        ticker.cancel()
    await contained(strict_executor, result, "wall_time", "wall-clock limit of 3 s")
    assert ticks > 50  # the host's loop ran all along (3 s at 10 ms a tick)
    assert strict_executor.replaced == replaced + 1


LOOPS_IN_CALLBACKS = {
    # a loop in the continuation of a tool call (it blocks the worker's own event loop)
    "tool-continuation": "await codemode.add({a: 1, b: 2}).then(() => { for (;;) {} })",
    # a loop in a getter, run while the input is turned into JSON
    "input-getter": "await codemode.add({get a() { for (;;) {} }, b: 1})",
    # a loop in toJSON, run while the result is turned into JSON
    "result-tojson": "return {toJSON() { while (1) {} }}",
    # a loop in a timer callback, after the program's last await
    "timer": "setTimeout(() => { while (1) {} }, 0); await new Promise(r => setTimeout(r, 5000))",
    # a promise that never settles
    "never-settles": "await new Promise(() => {})",
}


# Each of them can only end at the wall-clock limit (none reaches another limit), so a shorter
# one checks the same and spins five workers for 1 s rather than 3 s.
LOOPS_LIMITS = dataclasses.replace(ESCAPE_LIMITS, wall_time_s=1.0)


async def test_loops_inside_callbacks_are_stopped() -> None:
    # All at once, one worker each: every one of them lasts the whole wall-clock limit.
    async with shared_executor(LOOPS_LIMITS, workers=len(LOOPS_IN_CALLBACKS)) as pool:
        results = await asyncio.gather(
            *(pool.run(program, Calls().tools()) for program in LOOPS_IN_CALLBACKS.values())
        )
        for name, result in zip(LOOPS_IN_CALLBACKS, results, strict=True):
            assert result.limit == "wall_time", (name, result)
            await contained(pool, result, "wall_time", "wall-clock limit")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cpu_executor() -> AsyncIterator[CodeExecutor]:
    async with shared_executor(Limits(wall_time_s=60.0, cpu_time_s=0.5), workers=1) as pool:
        yield pool


async def test_cpu_time_is_limited_apart_from_wall_time(cpu_executor: CodeExecutor) -> None:
    result = await cpu_executor.run("let n = 0; for (;;) { n++ }")
    await contained(cpu_executor, result, "cpu_time", "CPU time limit of 0.5 s")
    assert result.elapsed_s < 30


async def test_deep_recursion(strict_executor: CodeExecutor) -> None:
    result = await strict_executor.run(
        "function down(n) { return down(n + 1) + 1 }\nreturn down(0)"
    )
    await contained(
        strict_executor, result, "stack", "RangeError: Maximum call stack size exceeded"
    )
    assert "at down (line 1:" in (result.error or "")


@pytest.mark.parametrize(
    ("program", "limit", "says"),
    [
        ("const b = new ArrayBuffer(2 * 1024 ** 3); return b.byteLength", "memory",
         "Array buffer allocation failed"),
        ("const parts = []; for (let i = 0; i < 20; i++) parts.push(new Uint8Array(100 << 20).fill(1));"
         "return parts.length", "memory", "Array buffer allocation failed"),
        ("const m = new WebAssembly.Memory({initial: 1, maximum: 65536}); m.grow(32768);"
         "return m.buffer.byteLength", "memory", "Unable to grow instance memory"),
        ("const a = []; for (;;) a.push({i: a.length, s: 'x' + a.length})", "heap",
         "JavaScript heap limit"),
    ],
    ids=["2GB-buffer", "2GB-in-chunks", "wasm-memory", "heap"],
)  # fmt: skip
async def test_memory_is_limited(
    strict_executor: CodeExecutor, program: str, limit: str, says: str
) -> None:
    result = await strict_executor.run(program)
    await contained(strict_executor, result, limit, says)


async def test_no_network_filesystem_or_process(strict_executor: CodeExecutor) -> None:
    names = [
        "fetch", "XMLHttpRequest", "WebSocket", "EventSource", "require", "module", "process",
        "Deno", "Bun", "navigator", "importScripts", "std", "os", "Buffer", "__dirname",
    ]  # fmt: skip
    result = await strict_executor.run(
        "async () => {"
        f"  const types = {{}}; for (const n of {names!r}) types[n] = typeof globalThis[n];"
        "  const errors = [];"
        "  for (const spec of ['node:fs', 'fs', 'node:net', 'child_process', 'http://127.0.0.1/x.js']) {"
        "    try { await import(spec); errors.push(spec + ': imported!') }"
        "    catch (e) { errors.push(spec + ': ' + e.name) }"
        "  }"
        "  try { new Function('return process')() } catch (e) { errors.push('process: ' + e.name) }"
        "  try { require('fs') } catch (e) { errors.push('require: ' + e.name) }"
        "  return {types, errors, globals: Object.getOwnPropertyNames(globalThis)};"
        "}"
    )
    assert result.ok, result.error
    assert set(result.result["types"].values()) == {"undefined"}
    for line in result.result["errors"]:
        assert "imported!" not in line, line
    assert "process: ReferenceError" in result.result["errors"]
    assert "require: ReferenceError" in result.result["errors"]
    # Nothing beyond ECMAScript's own globals, the console, the timers and codemode.
    extra = set(result.result["globals"]) - ECMASCRIPT_GLOBALS
    assert extra <= {"console", "codemode", "setTimeout", "clearTimeout", "__timer_manager",
                     "__codemode_start", "__codemode_settle"}, extra  # fmt: skip


# fmt: off
ECMASCRIPT_GLOBALS = {
    "Object", "Function", "Array", "Number", "parseFloat", "parseInt", "Infinity", "NaN",
    "undefined", "Boolean", "String", "Symbol", "Date", "Promise", "RegExp", "Error",
    "AggregateError", "EvalError", "RangeError", "ReferenceError", "SyntaxError", "TypeError",
    "URIError", "globalThis", "JSON", "Math", "Intl", "ArrayBuffer", "Atomics", "Uint8Array",
    "Int8Array", "Uint16Array", "Int16Array", "Uint32Array", "Int32Array", "BigUint64Array",
    "BigInt64Array", "Uint8ClampedArray", "Float32Array", "Float64Array", "Float16Array",
    "DataView", "Map", "BigInt", "Set", "Iterator", "WeakMap", "WeakSet", "Proxy", "Reflect",
    "FinalizationRegistry", "WeakRef", "decodeURI", "decodeURIComponent", "encodeURI",
    "encodeURIComponent", "escape", "unescape", "eval", "isFinite", "isNaN", "Temporal",
    "SuppressedError", "DisposableStack", "AsyncDisposableStack", "SharedArrayBuffer",
    "WebAssembly",
}
# fmt: on


async def test_the_worker_gets_none_of_the_hosts_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAYD_TEST_SECRET", "hunter2")
    async with CodeExecutor(workers=1) as pool:
        (pid,) = pool.worker_pids
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert b"hunter2" not in environ and b"GATEWAYD_TEST_SECRET" not in environ


async def test_tampering_with_intrinsics_breaks_only_the_program(
    strict_executor: CodeExecutor,
) -> None:
    calls = Calls()
    result = await strict_executor.run(
        "async () => {"
        '  JSON.stringify = () => \'{"a": 100, "b": 100}\';'
        "  JSON.parse = () => 'forged';"
        "  Array.prototype.push = () => { throw new Error('push hijacked') };"
        "  Promise.withResolvers = null;"  # frozen by the harness: ignored
        "  Promise.prototype.then = null;"
        "  const three = await codemode.add({a: 1, b: 2});"
        "  console.log('still logging');"
        "  return [three, typeof Promise.withResolvers, typeof Promise.prototype.then];"
        "}",
        calls.tools(),
    )
    assert result.ok, result.error
    assert result.result == [3, "function", "function"]
    assert calls.seen == [("add", {"a": 1, "b": 2})]
    assert [line.text for line in result.logs] == ["still logging"]
    clean = await strict_executor.run(
        "return [JSON.stringify({a: 1}), typeof [].push, Object.isFrozen(Promise)]"
    )
    assert clean.ok and clean.result[:2] == ['{"a":1}', "function"]


async def test_tampering_with_the_binding_proxy_is_refused(strict_executor: CodeExecutor) -> None:
    calls = Calls()
    result = await strict_executor.run(
        "'use strict';"
        "const refused = [];"
        "const attempts = {"
        "  assign: () => { codemode.add = () => 99 },"
        "  define: () => Object.defineProperty(codemode, 'add', {value: () => 99}),"
        "  remove: () => { delete codemode.add },"
        "  prototype: () => Object.setPrototypeOf(codemode, {add: () => 99}),"
        "  replace: () => { globalThis.codemode = {add: () => 99} },"
        "  fn: () => { codemode.add.call = () => 99 },"
        "  restart: () => { __codemode_start = () => 99 },"
        "  settle: () => { __codemode_settle = () => 99 },"
        "};"
        "for (const [name, attempt] of Object.entries(attempts)) {"
        "  try { attempt(); } catch (e) { refused.push(name + ': ' + e.name) }"
        "}"
        "__codemode_start(['fail'], 'return 1');"  # a second start is ignored
        "const sum = await codemode.add({a: 2, b: 2});"
        "return {refused, sum};",
        calls.tools(),
    )
    assert result.ok, result.error
    assert result.result["sum"] == 4
    assert sorted(result.result["refused"]) == sorted(
        f"{name}: TypeError"
        for name in (
            "assign",
            "define",
            "remove",
            "prototype",
            "replace",
            "fn",
            "restart",
            "settle",
        )
    )
    assert calls.seen == [("add", {"a": 2, "b": 2})]


async def test_very_large_values_are_refused(strict_executor: CodeExecutor) -> None:
    calls = Calls()
    too_big = await strict_executor.run("return 'x'.repeat(50000)")
    await contained(strict_executor, too_big, "result", "50002 characters of JSON, over the limit")
    big_input = await strict_executor.run(
        "try { await codemode.echo({text: 'x'.repeat(200000)}) } catch (e) { return e.message }",
        calls.tools(),
    )
    assert big_input.ok
    assert big_input.result == (
        "codemode.echo(input): the input is 200011 characters of JSON, over the limit of 100000"
    )
    assert calls.seen == []


async def test_thousands_of_tool_calls_are_cut_off(strict_executor: CodeExecutor) -> None:
    calls = Calls()
    limit = strict_executor.limits.max_tool_calls
    within = await strict_executor.run(
        f"const sums = await Promise.all(Array.from({{length: {limit}}}, "
        "(_, i) => codemode.add({a: i, b: 0})));"
        "return sums.reduce((x, y) => x + y, 0)",
        calls.tools(),
    )
    assert within.ok and within.result == sum(range(limit)) and within.tool_calls == limit
    sequential = await strict_executor.run(
        "for (let i = 0; i < 5000; i++) await codemode.add({a: i, b: 0})", calls.tools()
    )
    await contained(strict_executor, sequential, "tool_calls", f"more than {limit} tool calls")
    parallel = await strict_executor.run(
        "await Promise.all(Array.from({length: 5000}, (_, i) => codemode.add({a: i, b: 1})))",
        calls.tools(),
    )
    await contained(strict_executor, parallel, "tool_calls", f"more than {limit} tool calls")


async def test_a_worker_that_dies_mid_run_is_replaced(strict_executor: CodeExecutor) -> None:
    from gatewayd.tools import tool_from_function

    async def crash() -> None:
        """Kill every sandbox worker, as a V8 crash would."""
        for pid in strict_executor.worker_pids:
            os.kill(pid, 9)

    result = await strict_executor.run(
        "await codemode.crash(); return 'unreachable'", [tool_from_function(crash)]
    )
    await contained(strict_executor, result, "worker_died", "the sandbox worker died (")
    # Workers killed while idle: the next program still runs, on a replacement.
    for pid in strict_executor.worker_pids:
        os.kill(pid, 9)
    after = await strict_executor.run("return 3")
    assert after.ok and after.result == 3


async def test_a_cancelled_run_kills_its_worker(strict_executor: CodeExecutor) -> None:
    started = asyncio.Event()
    from gatewayd.tools import tool_from_function

    during: list[int] = []

    async def begin() -> None:
        """Signal that the program runs."""
        during.extend(strict_executor.worker_pids)  # the busy worker is one of them
        started.set()

    replaced = strict_executor.replaced
    run = asyncio.create_task(
        strict_executor.run("await codemode.begin(); for (;;) {}", [tool_from_function(begin)])
    )
    await asyncio.wait_for(started.wait(), WAIT_S)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert strict_executor.replaced == replaced + 1  # killed, and a replacement is on its way
    await wait_until(
        lambda: any(not running(pid) for pid in during), WAIT_S, "the busy worker to be killed"
    )
    after = await strict_executor.run("return 'fine'")
    assert after.ok and after.result == "fine"


async def test_a_program_cannot_forge_messages_to_the_host(strict_executor: CodeExecutor) -> None:
    calls = Calls()
    result = await strict_executor.run(
        "Object.prototype.toJSON = function () {"
        "  return {type: 'call', id: 99, tool: 'fail', input: '{\"reason\": \"forged\"}'} };"
        "console.log('plain');"
        "try { await codemode.add({a: 1, b: 2}) } catch (e) { return e.message }",
        calls.tools(),
    )
    assert result.ok, result.error
    assert [line.text for line in result.logs] == ["plain"]
    # The program's own input went through its toJSON (its choice), and was refused.
    assert result.result.startswith("add: invalid arguments")
    assert result.tool_calls == 1 and calls.seen == []
