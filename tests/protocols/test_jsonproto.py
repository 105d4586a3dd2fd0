"""The JSON protocol codec (pure): what is a protocol frame, parse errors, encoders."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import jsonproto
from protocols.jsonproto import ProtocolError, RpcRequest, StateUpdate, parse_client_text


@pytest.mark.parametrize(
    "text",
    ["hello", '{"temp": 21.5}', '{"type": "reading"}', "[1,2]", '"gw.rpc"', "{oops", ""],
)
def test_user_data_passes_through(text):
    assert parse_client_text(text) is None


def test_rpc_and_state_update():
    frame = parse_client_text('{"type":"gw.rpc","id":5,"method":"m","args":[1],"kwargs":{"a":2}}')
    assert frame == RpcRequest("5", "m", [1], {"a": 2})
    assert parse_client_text('{"type":"gw.rpc","id":"x","method":"m"}') == RpcRequest("x", "m")
    assert parse_client_text('{"type":"gw.set_state","state":null}') == StateUpdate(None)


@pytest.mark.parametrize(
    ("text", "message", "rpc_id"),
    [
        ('{"type":"gw.bogus"}', "unknown protocol frame type 'gw.bogus'", None),
        ('{"type":"gw.rpc","method":"m"}', "needs an 'id'", None),
        ('{"type":"gw.rpc","id":true,"method":"m"}', "needs an 'id'", None),
        ('{"type":"gw.rpc","id":1}', "non-empty string 'method'", "1"),
        ('{"type":"gw.rpc","id":1,"method":"m","args":{}}', "'args' must be a JSON array", "1"),
        (
            '{"type":"gw.rpc","id":1,"method":"m","kwargs":[]}',
            "'kwargs' must be a JSON object",
            "1",
        ),
        ('{"type":"gw.set_state"}', "needs a 'state' field", None),
        ('{"type":"gw.rpc", "id": 1', "malformed JSON protocol frame", None),
    ],
)
def test_bad_protocol_frames(text, message, rpc_id):
    with pytest.raises(ProtocolError, match=message) as info:
        parse_client_text(text)
    assert info.value.rpc_id == rpc_id


def test_encoders_round_trip():
    assert json.loads(jsonproto.encode_identity("c", "i", "l")) == {
        "type": "gw.identity",
        "agent": "c",
        "id": "i",
        "connection": "l",
    }
    assert jsonproto.decode_server_text(jsonproto.encode_state({"日": 1})) == {
        "type": "gw.state",
        "state": {"日": 1},
    }
    assert jsonproto.decode_server_text(jsonproto.encode_rpc_chunk("1", 2))["done"] is False
    err = jsonproto.decode_server_text(jsonproto.encode_rpc_error("1", "bad"))
    assert err == {"type": "gw.rpc_result", "id": "1", "ok": False, "done": True, "error": "bad"}
    assert jsonproto.decode_server_text("plain") is None
    with pytest.raises(TypeError):
        jsonproto.encode_rpc_result("1", object())


@given(st.text(max_size=200))
def test_any_text_is_data_or_a_clear_protocol_error(text):
    try:
        result = parse_client_text(text)
    except ProtocolError as err:
        assert str(err)
    else:
        assert result is None or isinstance(result, RpcRequest | StateUpdate)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=10,
    )
)
def test_any_json_with_gw_type_parses_or_errors_clearly(value):
    text = json.dumps({"type": "gw.rpc", "id": "1", "method": "m", "args": value})
    try:
        frame = parse_client_text(text)
    except ProtocolError:
        assert not isinstance(value, list)
    else:
        assert isinstance(value, list) and frame == RpcRequest("1", "m", value)


def test_extension_frames_are_passed_whole_to_the_agent_class():
    from protocols.jsonproto import ExtensionFrame

    text = '{"type":"gw.chat.send","id":"r1","messages":[]}'
    assert parse_client_text(text) == ExtensionFrame(
        "gw.chat.send", {"type": "gw.chat.send", "id": "r1", "messages": []}
    )
