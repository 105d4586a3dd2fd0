"""Builds the example model: a linear (PCA) autoencoder scoring sensor windows for anomalies.

    python -m engine.example_model engine/models/anomaly.onnx

Input:
    window          float32[N, 32]   N windows of 32 consecutive sensor readings
Outputs:
    score           float32[N]       mean squared reconstruction error per window
                                      (high = the window does not look like normal operation)
    reconstruction  float32[N, 32]   the window as the model reconstructs it

Normal operation is simulated as a sum of slow sinusoids with random phase and amplitude plus
sensor noise; the model keeps the top principal components of such windows, so normal
windows reconstruct well and spikes, steps or noise bursts do not. The score above which
fewer than 0.1% of normal windows fall is stored in the model's metadata as
`anomaly_threshold` (read it with `session.get_modelmeta().custom_metadata_map`).
The fit is seeded, so the file is reproducible.

Building needs the `onnx` package, which serving does not (the built model ships in
engine/models/): without it the command exits with `ONNX_MISSING`, which says what to install.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

# Keep in step with the `onnx` requirement of the `test` and `bench` extras in pyproject.toml.
ONNX_REQUIREMENT = "onnx>=1.16"
ONNX_MISSING = (
    "python -m engine.example_model needs the onnx package to build the model, and gatewayd's "
    f"runtime does not install it: pip install '{ONNX_REQUIREMENT}' (in a checkout: "
    "scripts/setup cpu,test). The built model already ships as engine/models/anomaly.onnx."
)

WINDOW = 32
COMPONENTS = 6
TRAIN_WINDOWS = 20_000
SEED = 20261126


def normal_windows(count: int, rng: np.random.Generator) -> np.ndarray:
    """Windows of a healthy sensor: two slow harmonics with random phase, plus noise."""
    t = np.arange(WINDOW, dtype=np.float64)[None, :]
    phase = rng.uniform(0, 2 * np.pi, size=(count, 1))
    amplitude = rng.uniform(0.5, 1.5, size=(count, 1))
    offset = rng.normal(20.0, 0.5, size=(count, 1))  # e.g. a temperature around 20 °C
    signal = amplitude * np.sin(2 * np.pi * t / WINDOW + phase)
    signal += 0.3 * amplitude * np.sin(4 * np.pi * t / WINDOW + 2 * phase)
    noise = rng.normal(0.0, 0.05, size=(count, WINDOW))
    return (offset + signal + noise).astype(np.float32)


def fit(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, top principal components (WINDOW x COMPONENTS) and the 99.9% score threshold."""
    data = windows.astype(np.float64)
    mean = data.mean(axis=0)
    _, _, vt = np.linalg.svd(data - mean, full_matrices=False)
    components = vt[:COMPONENTS].T
    centred = data - mean
    reconstruction = centred @ components @ components.T + mean
    scores = ((data - reconstruction) ** 2).mean(axis=1)
    return mean.astype(np.float32), components.astype(np.float32), float(np.quantile(scores, 0.999))


def build(mean: np.ndarray, components: np.ndarray, threshold: float) -> onnx.ModelProto:
    """The ONNX graph: centre, project, reconstruct, score. Batch axis N is dynamic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    initializers = [
        numpy_helper.from_array(mean[None, :], "mean"),
        numpy_helper.from_array(components, "encode"),
        numpy_helper.from_array(np.ascontiguousarray(components.T), "decode"),
    ]
    nodes = [
        helper.make_node("Sub", ["window", "mean"], ["centred"]),
        helper.make_node("MatMul", ["centred", "encode"], ["code"]),
        helper.make_node("MatMul", ["code", "decode"], ["centred_reconstruction"]),
        helper.make_node("Add", ["centred_reconstruction", "mean"], ["reconstruction"]),
        helper.make_node("Sub", ["centred", "centred_reconstruction"], ["residual"]),
        helper.make_node("Mul", ["residual", "residual"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["score"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "anomaly_autoencoder",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["N", WINDOW])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("reconstruction", TensorProto.FLOAT, ["N", WINDOW]),
        ],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="gatewayd.engine.example_model",
    )
    model.ir_version = 8  # loadable by onnxruntime >= 1.14
    helper.set_model_props(model, {"anomaly_threshold": f"{threshold:.6g}", "window": str(WINDOW)})
    onnx.checker.check_model(model)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the .onnx file")
    args = parser.parse_args(argv)
    try:
        import onnx
    except ImportError:
        raise SystemExit(ONNX_MISSING) from None
    rng = np.random.default_rng(SEED)
    mean, components, threshold = fit(normal_windows(TRAIN_WINDOWS, rng))
    model = build(mean, components, threshold)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(args.out))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes); anomaly_threshold={threshold:.6g}")


if __name__ == "__main__":
    main()
