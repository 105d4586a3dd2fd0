"""The example thermostat with a real ONNX anomaly model on onnxruntime, and without one."""

from __future__ import annotations

import asyncio
import json

import cbor2
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gatewayd.examples.thermostat import BadReading, Thermostat, parse_reading
from protocols.link import Outcome
from tests.agents.conftest import MemoryLink

pytestmark = pytest.mark.timeout(60)


def build_anomaly_model(path) -> None:
    """score = max |x - mean(x)| over a window of 32 readings."""
    window = helper.make_tensor_value_info("window", TensorProto.FLOAT, ["N", 32])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])
    nodes = [
        helper.make_node("ReduceMean", ["window"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["window", "mean"], ["centered"]),
        helper.make_node("Abs", ["centered"], ["deviation"]),
        helper.make_node("ReduceMax", ["deviation"], ["score"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "anomaly", [window], [score])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, path)


class OrtEngine:
    """Minimal engine over a real onnxruntime session (the runtime only needs `infer`)."""

    def __init__(self, path) -> None:
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.calls = 0

    def model_names(self) -> list[str]:
        return ["anomaly"]

    async def infer(self, model, inputs, **kw):
        self.calls += 1
        (score,) = await asyncio.to_thread(self.session.run, None, {"window": inputs})
        return {"score": score}


def test_parse_reading():
    assert parse_reading('{"temp": 21.5}') == 21.5
    assert parse_reading(cbor2.dumps({"temp": 19})) == 19.0
    for bad in ("{oops", b"\xff\xff", '{"temp": "hot"}', '{"temp": true}', "[1]", '{"temp": 999}'):
        with pytest.raises(BadReading):
            parse_reading(bad)


async def test_thermostat_with_anomaly_model(make_runtime, tmp_path):
    build_anomaly_model(tmp_path / "anomaly.onnx")
    engine = OrtEngine(tmp_path / "anomaly.onnx")
    async with make_runtime({"thermostat": Thermostat}, engine=engine) as rt:
        dash = MemoryLink("thermostat", "living")
        device = MemoryLink("thermostat", "living", transport="ws")
        await rt.open_link(dash, {"path": "/agents/thermostat/living"})
        await rt.open_link(device, {"path": "/agents/thermostat/living?device=1"})
        for i in range(31):
            await rt.submit_message(device, cbor2.dumps({"temp": 20.0 + (i % 2) * 0.1}))
        assert (await rt.get_agent_state("thermostat", "living"))["anomaly"] is None
        await rt.submit_message(device, cbor2.dumps({"temp": 35.0}))  # the 32nd: a spike
        state = await rt.get_agent_state("thermostat", "living")
        assert state["anomaly"] == pytest.approx(35.0 - (31 * 20.05 - 0.05 + 35.0) / 32, abs=0.05)
        assert state["readings"] == 32 and state["heating"] is False and engine.calls == 1
        # The device only ever got CBOR replies; the dashboard got state frames.
        assert all(isinstance(m, bytes) for m in device.sent)
        assert cbor2.loads(device.sent[0]) == {"heating": True}
        assert dash.frames("gw.state")[-1]["state"]["temp"] == 35.0
        # Dashboard sets the target through RPC; a bad value is refused.
        await asyncio.gather(
            rt.submit_message(
                dash, json.dumps({"type": "gw.rpc", "id": 1, "method": "set_target", "args": [40]})
            ),
            rt.submit_message(
                dash, json.dumps({"type": "gw.rpc", "id": 2, "method": "set_target", "args": [22]})
            ),
            return_exceptions=True,
        )
        replies = {f["id"]: f for f in dash.frames("gw.rpc_result")}
        assert "5..30" in replies["1"]["error"] and replies["2"]["result"] == 22.0
        await rt.submit_message(
            dash, json.dumps({"type": "gw.rpc", "id": 3, "method": "history", "args": [2]})
        )
        chunks = [
            f["chunk"]["temp"]
            for f in dash.frames("gw.rpc_result")
            if f["id"] == "3" and not f["done"]
        ]
        assert chunks == [20.0, 35.0]
        schedules = await rt.run_in_agent(
            "thermostat", "living", lambda a: [s.method for s in a.get_schedules()]
        )
        assert schedules == ["check_stale"]


async def test_thermostat_without_engine_and_bad_input(make_runtime):
    async with make_runtime({"thermostat": Thermostat}) as rt:
        dash = MemoryLink("thermostat", "k")
        await rt.open_link(dash, {})
        for i in range(40):
            assert (
                await rt.submit_message(dash, json.dumps({"temp": 18 + i * 0.01}))
                is Outcome.APPLIED
            )
        with pytest.raises(BadReading):
            await rt.submit_message(dash, "{not json")
        assert "not valid JSON" in dash.frames("gw.error")[0]["error"]
        state = await rt.get_agent_state("thermostat", "k")
        assert state["anomaly"] is None and state["readings"] == 40 and state["heating"] is True
