from pathlib import Path

import pytest

from engine import ModelSpec


def test_defaults_and_coercion() -> None:
    spec = ModelSpec("m", "m.onnx", providers=["cuda", "cpu"], buckets=[1, 4])  # type: ignore[arg-type]
    assert spec.path == Path("m.onnx")
    assert spec.providers == ("cuda", "cpu")
    assert spec.buckets == (1, 4)
    assert spec.max_batch_rows == 4
    assert ModelSpec("m", Path("m.onnx")).buckets == (1, 2, 4, 8, 16, 32, 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"providers": ("gpu",)}, "unknown provider 'gpu'"),
        ({"providers": ()}, "providers must list"),
        ({"providers": ("cpu", "cpu")}, "twice"),
        ({"buckets": ()}, "at least one batch size"),
        ({"buckets": (4, 2)}, "strictly increasing"),
        ({"buckets": (0, 2)}, "positive integers"),
        ({"max_queue_delay_s": -0.1}, "max_queue_delay_s must be >= 0"),
        ({"max_queue_delay_s": float("nan")}, "finite"),
        ({"request_timeout_s": 0}, "request_timeout_s must be > 0"),
        ({"queue_limit": 8, "buckets": (1, 16)}, "queue_limit (8 rows)"),
        ({"priority_levels": 0}, "priority_levels must be >= 1"),
        ({"priority_levels": 1000}, "at most"),
        ({"intra_op_threads": -1}, "intra_op_threads must be >= 0"),
        ({"cuda_graphs": "yes"}, "cuda_graphs must be true or false"),
    ],
)
def test_invalid_settings_name_the_model(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        ModelSpec("detector", Path("d.onnx"), **kwargs)
    assert "model 'detector'" in str(caught.value)
    assert message in str(caught.value)


def test_empty_name_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        ModelSpec("", Path("d.onnx"))


def test_frozen() -> None:
    spec = ModelSpec("m", Path("m.onnx"))
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]
