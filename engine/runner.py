"""Runs batches of one model: fixed per-bucket buffers, IOBinding, one CUDA graph per bucket.

Every method here runs on one thread at a time: the model's worker thread (CUDA graphs live in
ONNX Runtime's per-thread context, so capture and replay must share a thread), or on CPU the
event loop's thread for an inline run while the worker is idle. Each bucket owns input and
output buffers allocated once; a batch is copied into the bucket's host input buffer with one
numpy concatenate per input, uploaded in place (`OrtValue.update_inplace`) when the buffers live on the GPU, and
run with the run option `gpu_graph_id` = the bucket's index. The first run of each bucket (at
warm-up) captures its graph; later runs replay it. Because a bucket's buffers never change
shape or address, a graph is never replayed with a shape other than the one it captured.
On CPU the buffers are numpy arrays shared with ONNX Runtime (no copies) and the graph id is
accepted and ignored, so the same code path is exercised by CPU tests.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from engine import metrics
from engine.errors import ModelLoadError
from engine.providers import LoadedSession
from engine.spec import ModelSpec

log = logging.getLogger(__name__)

_NO_GRAPH = "-1"  # gpu_graph_id value that runs without capturing or replaying a graph


@dataclass(slots=True)
class _Bucket:
    rows: int
    graph_id: int
    host_inputs: dict[str, np.ndarray]
    device_inputs: dict[str, ort.OrtValue]
    binding: ort.IOBinding
    run_options: ort.RunOptions
    host_outputs: dict[str, np.ndarray] = field(default_factory=dict)  # cpu device only
    device_outputs: dict[str, ort.OrtValue] = field(default_factory=dict)
    dirty_rows: int = 0  # rows holding data from an earlier batch (padding must be zeroed)
    serve_count: int = 0  # serve runs so far (plain int: the metric is updated off the hot path)
    serve_reported: int = 0


class Runner:
    """Owns a model's session and bucket buffers; call only from the worker thread."""

    def __init__(self, spec: ModelSpec, loaded: LoadedSession, *, staged: bool | None = None):
        """`staged`: keep separate host and device buffers and upload each batch (the GPU
        path). Defaults to True off-CPU; tests set it on CPU to exercise that path."""
        self.spec = spec
        self.session = loaded.session
        self.inputs = loaded.inputs
        self.outputs = loaded.outputs
        self.device = loaded.device
        self.provider = loaded.provider
        self.cuda_graphs = loaded.cuda_graphs
        self._on_cpu = loaded.device == "cpu" if staged is None else not staged
        self._buckets = [self._make_bucket(index, rows) for index, rows in enumerate(spec.buckets)]
        self.warm_run_s = [math.inf] * len(self._buckets)  # each bucket's warm-up run
        self.warm_cpu_s = [math.inf] * len(self._buckets)  # its CPU time (this thread's)
        # Bucket index by row count (0 .. largest bucket): one list lookup per batch.
        self._bucket_of = [self.bucket_for(max(rows, 1)) for rows in range(spec.buckets[-1] + 1)]
        self._batches = {
            (b.rows, phase): metrics.BATCHES.labels(spec.name, str(b.rows), phase)
            for b in self._buckets
            for phase in ("warmup", "serve")
        }

    def terminate(self) -> None:
        """Make the run in progress, and every later one, fail at once (a closing engine that
        cannot wait). Safe from any thread: ORT polls `RunOptions.terminate` between kernels."""
        for bucket in self._buckets:
            bucket.run_options.terminate = True

    def bucket_for(self, rows: int) -> int:
        """Index of the smallest bucket holding `rows` (callers never exceed the largest)."""
        for index, size in enumerate(self.spec.buckets):
            if rows <= size:
                return index
        raise AssertionError(f"{rows} rows exceed the largest bucket {self.spec.buckets[-1]}")

    def warm_up(self) -> None:
        """Run every bucket once, largest first (captures one CUDA graph per bucket)."""
        # Largest first so the memory arena grows once to its peak before smaller captures.
        for bucket in reversed(self._buckets):
            started = time.perf_counter()
            cpu_started = time.thread_time()
            if not bucket.device_outputs:
                self._bind_outputs(bucket)
            self._run(bucket)
            for spec in self.outputs:
                got = bucket.device_outputs[spec.name].shape()
                if not got or got[0] != bucket.rows:
                    raise ModelLoadError(
                        f"model {self.spec.name!r}: output {spec.name!r} has shape {got} for a "
                        f"batch of {bucket.rows}; outputs must carry the batch on axis 0"
                    )
            self._batches[bucket.rows, "warmup"].inc()
            self.warm_run_s[bucket.graph_id] = time.perf_counter() - started
            self.warm_cpu_s[bucket.graph_id] = time.thread_time() - cpu_started
            log.debug(
                "engine: model %r: bucket %d warm in %.1f ms",
                self.spec.name,
                bucket.rows,
                (time.perf_counter() - started) * 1e3,
            )

    def bucket_of(self, rows: int) -> int:
        """`bucket_for` by table lookup (1 <= rows <= largest bucket)."""
        return self._bucket_of[rows]

    def run(self, requests: Sequence[Mapping[str, np.ndarray]], rows: int) -> dict[str, np.ndarray]:
        """Run `requests` (each `{input name: array}`, `rows` rows in all) as one padded batch:
        every output's first `rows` rows, in request order, as fresh arrays (`split_rows` cuts
        them per request). `load` then `run_loaded`."""
        return self.run_loaded(self.load(requests, rows), rows)

    def load(self, requests: Sequence[Mapping[str, np.ndarray]], rows: int) -> int:
        """Copy `requests` into their bucket's input buffers; the bucket's index. The bucket's
        previous run must have ended (its outputs are copied out before `run_loaded` returns)."""
        index = self._bucket_of[rows]
        bucket = self._buckets[index]
        host_inputs = bucket.host_inputs
        if len(requests) == 1:
            for name, array in requests[0].items():
                host_inputs[name][:rows] = array
        else:
            for name, host in host_inputs.items():
                # One C-level copy of every request's rows, straight into the bucket buffer.
                np.concatenate([inputs[name] for inputs in requests], out=host[:rows])
        if bucket.dirty_rows > rows:
            # Zero stale rows so padding is deterministic (it never reaches a caller anyway).
            for buffer in host_inputs.values():
                buffer[rows : bucket.dirty_rows] = 0
        bucket.dirty_rows = rows
        return index

    def run_loaded(self, index: int, rows: int) -> dict[str, np.ndarray]:
        """Run bucket `index` as loaded by `load` (`rows` real rows); outputs as `run`."""
        bucket = self._buckets[index]
        self._run(bucket)
        bucket.serve_count += 1
        if self._on_cpu:
            # One copy out of the reused output buffers; callers get views of that copy.
            return {n: a[:rows].copy() for n, a in bucket.host_outputs.items()}
        copied = bucket.binding.copy_outputs_to_cpu()  # fresh host arrays, bound order
        return {s.name: a[:rows] for s, a in zip(self.outputs, copied, strict=True)}

    def flush_metrics(self) -> None:
        """Add the serve runs counted since the last call to the batches metric."""
        for bucket in self._buckets:
            count = bucket.serve_count
            if count != bucket.serve_reported:
                self._batches[bucket.rows, "serve"].inc(count - bucket.serve_reported)
                bucket.serve_reported = count

    def _run(self, bucket: _Bucket) -> None:
        if not self._on_cpu:
            for name, host in bucket.host_inputs.items():
                device = bucket.device_inputs[name]
                # Captured graphs read these exact device addresses at this exact shape.
                assert device.shape()[0] == bucket.rows == host.shape[0]
                device.update_inplace(host)
        self.session.run_with_iobinding(bucket.binding, bucket.run_options)

    def _make_bucket(self, index: int, rows: int) -> _Bucket:
        binding = self.session.io_binding()
        host_inputs: dict[str, np.ndarray] = {}
        device_inputs: dict[str, ort.OrtValue] = {}
        for spec in self.inputs:
            assert spec.row_shape is not None  # describe_io guarantees inputs have row shapes
            host = np.zeros((rows, *spec.row_shape), dtype=spec.dtype)
            host_inputs[spec.name] = host
            if self._on_cpu:
                value = ort.OrtValue.ortvalue_from_numpy(host)  # shares host's memory
            else:
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    host.shape, spec.dtype, self.device, 0
                )
            device_inputs[spec.name] = value
            binding.bind_ortvalue_input(spec.name, value)
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(index))
        bucket = _Bucket(rows, index, host_inputs, device_inputs, binding, run_options)
        if all(spec.row_shape is not None for spec in self.outputs):
            self._bind_outputs(bucket)
        return bucket

    def _bind_outputs(self, bucket: _Bucket) -> None:
        known = {s.name: s.row_shape for s in self.outputs if s.row_shape is not None}
        shapes = known if len(known) == len(self.outputs) else self._probe_output_row_shapes(bucket)
        for spec in self.outputs:
            shape = (bucket.rows, *shapes[spec.name])
            if self._on_cpu:
                host = np.zeros(shape, dtype=spec.dtype)
                bucket.host_outputs[spec.name] = host
                value = ort.OrtValue.ortvalue_from_numpy(host)
            else:
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, spec.dtype, self.device, 0)
            bucket.device_outputs[spec.name] = value
            bucket.binding.bind_ortvalue_output(spec.name, value)

    def _probe_output_row_shapes(self, bucket: _Bucket) -> dict[str, tuple[int, ...]]:
        """Output shapes the metadata leaves open, learnt from one graph-less run."""
        probe = self.session.io_binding()
        for name, value in bucket.device_inputs.items():
            probe.bind_ortvalue_input(name, value)
        for spec in self.outputs:
            probe.bind_output(spec.name, self.device)
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", _NO_GRAPH)
        if not self._on_cpu:
            for name, host in bucket.host_inputs.items():
                bucket.device_inputs[name].update_inplace(host)
        self.session.run_with_iobinding(probe, options)
        return {
            spec.name: tuple(value.shape()[1:])
            for spec, value in zip(self.outputs, probe.get_outputs(), strict=True)
        }


def split_rows(
    outputs: Mapping[str, np.ndarray], row_counts: Sequence[int]
) -> list[dict[str, np.ndarray]]:
    """Cut a batch's `outputs` into each request's rows (`row_counts`: rows per request, in
    batch order), as views. One row per request (the common case) lets numpy cut the rows in
    C: one pass per output over `array[:, None]`, no Python slicing."""
    if len(row_counts) == 1:
        return [dict(outputs)]
    items = iter(outputs.items())
    first_name, first = next(items)
    if len(row_counts) == len(first):  # one row each
        results = [{first_name: view} for view in first[:, None]]
        for name, array in items:
            for result, view in zip(results, array[:, None], strict=True):
                result[name] = view
        return results
    results = []
    offset = 0
    for count in row_counts:
        end = offset + count
        results.append({n: a[offset:end] for n, a in outputs.items()})
        offset = end
    return results
