"""CodeExecutor: programs run in a real V8 worker process; results, logs and tool calls."""

from __future__ import annotations

import pytest

from gatewayd.codemode import CodeExecutor
from tests.codemode.conftest import Calls

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_an_arrow_function_and_a_bare_body_both_run(executor: CodeExecutor) -> None:
    arrow = await executor.run("async () => { return {sum: 1 + 2, list: [1, 'a', null]} }")
    assert arrow.ok and arrow.result == {"sum": 3, "list": [1, "a", None]}
    body = await executor.run("const x = 6 * 7;\nreturn x;")
    assert body.ok and body.result == 42
    nothing = await executor.run("const x = 1;")
    assert nothing.ok and nothing.result is None
    assert nothing.for_model() == {"result": None}


async def test_console_output_is_captured_in_order(executor: CodeExecutor) -> None:
    result = await executor.run(
        "console.log('a', 1, {b: [2]}); console.warn('careful'); console.error(new Error('x').message);"
        "return 'done'"
    )
    assert result.ok and result.result == "done"
    assert [(line.level, line.text) for line in result.logs] == [
        ("log", 'a 1 {"b":[2]}'),
        ("warn", "careful"),
        ("error", "x"),
    ]
    assert result.for_model()["logs"] == ['a 1 {"b":[2]}', "[warn] careful", "[error] x"]


async def test_errors_name_the_program_line(executor: CodeExecutor) -> None:
    thrown = await executor.run(
        "const a = 1;\nfunction f() { throw new TypeError('bad ' + a) }\nf();"
    )
    assert not thrown.ok and thrown.limit is None
    assert thrown.error is not None
    assert thrown.error.startswith("TypeError: bad 1\n    at f (line 2:22)")
    syntax = await executor.run("return {")
    assert syntax.error is not None and syntax.error.startswith("SyntaxError:")
    not_json = await executor.run("return {n: 10n}")
    assert not_json.error is not None and "cannot be turned into JSON" in not_json.error
    weird = await executor.run("throw {code: 7}")
    assert weird.error == 'Uncaught {"code":7}'


async def test_tool_calls_reach_the_host_validated(executor: CodeExecutor) -> None:
    calls = Calls()
    result = await executor.run(
        "async () => {"
        "  const three = await codemode.add({a: 1, b: 2});"
        "  const echoed = await codemode.echo({text: 'héllo ✓'});"
        "  return [three, echoed];"
        "}",
        calls.tools(),
    )
    assert result.ok, result.error
    assert result.result == [3, {"text": "héllo ✓"}]
    assert calls.seen == [("add", {"a": 1, "b": 2}), ("echo", {"text": "héllo ✓"})]
    assert result.tool_calls == 2


async def test_bad_tool_input_is_an_error_the_program_can_catch(executor: CodeExecutor) -> None:
    calls = Calls()
    result = await executor.run(
        "async () => {"
        "  const errors = [];"
        "  for (const input of [{a: 'x', b: 1}, {a: 1}, {a: 1, b: 2, c: 3}, 'text']) {"
        "    try { await codemode.add(input) } catch (e) { errors.push(e.name + ': ' + e.message) }"
        "  }"
        "  try { await codemode.fail({reason: 'broken relay'}) } catch (e) { errors.push(e.message) }"
        "  try { codemode.nope({}) } catch (e) { errors.push(e.message) }"
        "  try { await codemode.add({a: 1n, b: 2}) } catch (e) { errors.push(e.name) }"
        "  return errors;"
        "}",
        calls.tools(),
    )
    assert result.ok, result.error
    errors = result.result
    assert errors[0].startswith(
        "ToolError: add: invalid arguments: a: Input should be a valid integer"
    )
    assert errors[1] == "ToolError: add: invalid arguments: b: Field required"
    assert "c: Extra inputs are not permitted" in errors[2]
    assert errors[3] == 'ToolError: codemode.add: the input must be an object, got "text"'
    assert errors[4] == "fail failed: RuntimeError: broken relay"
    assert errors[5] == "codemode.nope is not a tool here; the tools are: add, echo, fail"
    assert errors[6] == "TypeError"
    assert calls.seen == []  # nothing invalid reached the tool


async def test_concurrent_calls_are_bounded(executor: CodeExecutor) -> None:
    bound = executor.limits.max_concurrent_tool_calls
    calls = Calls(hold_until_in_flight=bound)  # all wait until `bound` run at once
    result = await executor.run(
        "const texts = Array.from({length: 40}, (_, i) => 't' + i);"
        "const out = await Promise.all(texts.map(text => codemode.echo({text})));"
        "return out.map(o => o.text).join(',');",
        calls.tools(),
    )
    assert result.ok, result.error
    assert result.result == ",".join(f"t{i}" for i in range(40))
    assert calls.most_in_flight == bound


async def test_each_run_gets_a_fresh_context(executor: CodeExecutor) -> None:
    first = await executor.run(
        "globalThis.leftover = 'secret'; Object.prototype.polluted = 1; Array.prototype.map = null;"
        "return typeof leftover"
    )
    second = await executor.run("return [typeof leftover, ({}).polluted, typeof [].map]")
    assert first.ok and first.result == "string"
    assert first.worker_pid == second.worker_pid  # same process, new context
    assert second.ok and second.result == ["undefined", None, "function"]


async def test_timers_work_inside_a_run_and_die_with_it(executor: CodeExecutor) -> None:
    marks: list[str] = []
    from gatewayd.tools import tool_from_function

    async def mark(label: str) -> None:
        """Record a label."""
        marks.append(label)

    tools = [tool_from_function(mark)]
    first = await executor.run(
        "setTimeout(() => codemode.mark({label: 'late'}), 100);"
        "await new Promise(resolve => setTimeout(resolve, 10));"
        "await codemode.mark({label: 'first'});",
        tools,
    )
    assert first.ok, first.error
    # The next run, on the same worker, outlives the first run's timer by far.
    second = await executor.run(
        "await new Promise(resolve => setTimeout(resolve, 400)); return 'waited'", tools
    )
    assert first.worker_pid == second.worker_pid
    assert second.ok and second.result == "waited"
    assert marks == ["first"]


async def test_logs_are_bounded(executor: CodeExecutor) -> None:
    limit = executor.limits.max_log_lines
    result = await executor.run(f"for (let i = 0; i < {limit * 3}; i++) console.log('line', i)")
    assert result.ok
    assert len(result.logs) == limit + 1
    assert result.logs[-1].level == "warn" and "further logs dropped" in result.logs[-1].text


async def test_code_over_the_limit_is_refused_before_running(executor: CodeExecutor) -> None:
    result = await executor.run("//" + "x" * executor.limits.max_code_chars)
    assert not result.ok and result.limit == "code"
    assert result.worker_pid is None


async def test_nothing_a_finished_program_does_reaches_the_next_run(executor: CodeExecutor) -> None:
    calls = Calls()
    for _ in range(5):
        first = await executor.run(
            "setTimeout(() => { console.log('late'); codemode.add({a: 1, b: 2}) }, 1);"
            "Promise.resolve().then(() => console.log('after return'));"
            "return 1",
            calls.tools(),
        )
        second = await executor.run(
            "await new Promise(r => setTimeout(r, 50)); return 2", calls.tools()
        )
        assert first.worker_pid == second.worker_pid
        assert first.ok and second.ok and second.result == 2
        assert [line.text for line in second.logs] == []
        assert all(line.text != "late" for line in first.logs)
    assert calls.seen == []
