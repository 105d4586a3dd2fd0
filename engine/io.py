"""The model's inputs and outputs as the batcher needs them, and request validation.

The batcher stacks requests along axis 0, so every input and output must have a dynamic
axis 0 and fixed other axes. Validation compares a request against this description and
raises `InvalidInput` naming the input and the expected vs. received name/dtype/shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from engine.errors import InvalidInput, ModelLoadError

_ORT_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output: its name, dtype and the shape of one row (axes 1..)."""

    name: str
    dtype: np.dtype[Any]
    row_shape: tuple[int, ...] | None  # None: unknown from metadata (outputs only)

    def describe(self, rows: int | str = "N") -> str:
        shape = "?" if self.row_shape is None else ", ".join(str(d) for d in self.row_shape)
        return f"{self.name}: {self.dtype}[{rows}{', ' if shape else ''}{shape}]"


def describe_io(
    model: str, session: ort.InferenceSession
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs of a session; `ModelLoadError` if they cannot be batched."""
    inputs = tuple(
        _tensor_spec(model, "input", arg, need_row_shape=True) for arg in session.get_inputs()
    )
    outputs = tuple(
        _tensor_spec(model, "output", arg, need_row_shape=False) for arg in session.get_outputs()
    )
    return inputs, outputs


def _tensor_spec(model: str, kind: str, arg: ort.NodeArg, *, need_row_shape: bool) -> TensorSpec:
    where = f"model {model!r}: {kind} {arg.name!r}"
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise ModelLoadError(f"{where} has type {arg.type}, which the engine cannot batch")
    shape = arg.shape
    if not shape:
        raise ModelLoadError(f"{where} is a scalar; the engine needs a batch axis 0")
    if isinstance(shape[0], int):
        raise ModelLoadError(
            f"{where} has a fixed batch dimension {shape[0]}; export it with a dynamic axis 0"
        )
    row_shape = tuple(shape[1:])
    if all(isinstance(d, int) and d > 0 for d in row_shape):
        return TensorSpec(arg.name, dtype, row_shape)
    if need_row_shape:
        raise ModelLoadError(
            f"{where} has dynamic dimensions {list(shape[1:])} besides the batch axis; "
            "the engine needs fixed shapes on axes 1.. to pad into buckets"
        )
    return TensorSpec(arg.name, dtype, None)


_NO_REQUEST: dict[str, Any] = {}  # never holds anything: `.get` finds no array


class RequestValidator:
    """Checks requests against a model's inputs; built once per model, called per request.

    The common case (a dict or array with the right names, dtypes and shapes) takes a few
    attribute lookups per input; the messages are only built when something is wrong.
    """

    def __init__(self, model: str, inputs_spec: tuple[TensorSpec, ...], max_rows: int) -> None:
        self.model = model
        self.inputs_spec = inputs_spec
        self.max_rows = max_rows
        self._checks: list[tuple[str, np.dtype[Any], tuple[int, ...], int]] = []
        for spec in inputs_spec:
            assert spec.row_shape is not None  # describe_io guarantees inputs have row shapes
            self._checks.append((spec.name, spec.dtype, spec.row_shape, len(spec.row_shape) + 1))
        self._single = inputs_spec[0].name if len(inputs_spec) == 1 else None
        self._fast = self._checks[0] if len(self._checks) == 1 else None

    def __call__(self, inputs: object) -> tuple[dict[str, np.ndarray], int]:
        """The request as `{name: array}` and its row count, or `InvalidInput`."""
        fast = self._fast
        if fast is not None:
            # The common cases, a one-input model called with a plain dict or one array: a
            # few compares.
            name, dtype, row_shape, ndim = fast
            request: dict[str, Any] = _NO_REQUEST
            if type(inputs) is np.ndarray:
                request = {name: inputs}
            elif type(inputs) is dict and len(inputs) == 1:
                request = inputs
            array = request.get(name)
            if type(array) is np.ndarray:
                shape = array.shape
                # Builtin dtypes are singletons: `is` first, `==` only for an equal copy.
                if (
                    len(shape) == ndim
                    and shape[1:] == row_shape
                    and 0 < shape[0] <= self.max_rows
                    and (array.dtype is dtype or array.dtype == dtype)
                ):
                    return request, shape[0]
        return self._check(inputs)

    def _check(self, inputs: object) -> tuple[dict[str, np.ndarray], int]:
        model = self.model
        if type(inputs) is np.ndarray or isinstance(inputs, np.ndarray):
            if self._single is None:
                names = ", ".join(s.name for s in self.inputs_spec)
                raise InvalidInput(
                    f"model {model!r} has {len(self.inputs_spec)} inputs ({names}); pass a "
                    "dict, not a single array"
                )
            inputs = {self._single: inputs}
        elif not isinstance(inputs, Mapping):
            raise InvalidInput(
                f"model {model!r}: inputs must be a dict of numpy arrays or one numpy array, "
                f"got {type(inputs).__name__}"
            )
        if len(inputs) != len(self._checks):
            self._raise_names(inputs)
        rows = -1
        checked: dict[str, np.ndarray] = {}
        for name, dtype, row_shape, ndim in self._checks:
            array = inputs.get(name)
            if array is None:
                self._raise_names(inputs)
            if type(array) is not np.ndarray and not isinstance(array, np.ndarray):
                raise InvalidInput(
                    f"model {model!r}: input {name!r} must be a numpy array, "
                    f"got {type(array).__name__}"
                )
            if array.dtype != dtype:
                raise InvalidInput(
                    f"model {model!r}: input {name!r} expected dtype {dtype}, "
                    f"received {array.dtype}"
                )
            shape = array.shape
            if len(shape) != ndim or shape[1:] != row_shape:
                expected = next(s for s in self.inputs_spec if s.name == name).describe()
                raise InvalidInput(
                    f"model {model!r}: input {name!r} expected shape {expected}"
                    f" (rows on axis 0), received {list(shape)}"
                )
            if rows < 0:
                rows = shape[0]
            elif shape[0] != rows:
                raise InvalidInput(
                    f"model {model!r}: inputs disagree on the row count (axis 0): "
                    f"{name!r} has {shape[0]}, earlier inputs have {rows}"
                )
            checked[name] = array
        if rows < 1:
            raise InvalidInput(f"model {model!r}: a request must carry at least 1 row, got 0")
        if rows > self.max_rows:
            raise InvalidInput(
                f"model {model!r}: request has {rows} rows, more than the largest bucket "
                f"({self.max_rows}); split it into requests of at most {self.max_rows} rows"
            )
        return checked, rows

    def _raise_names(self, inputs: Mapping[str, object]) -> None:
        expected = ", ".join(s.name for s in self.inputs_spec)
        received = ", ".join(repr(k) for k in inputs)
        raise InvalidInput(
            f"model {self.model!r}: expected inputs ({expected}), received ({received})"
        )
