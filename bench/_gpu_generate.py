"""The generation section of bench/gpu_check.py: the paged-KV decoder on the CUDA EP.

The decoder graph of `engine.generate` (SmolLM2-135M's shapes: the converted model from the
cache when there is one, else the same shapes with random weights built here, since the GPU
machine cannot download) runs with IOBinding: the KV pool, block table and every other input
live on the device, outputs are bound to device buffers, so a step moves no KV over PCIe.
Measured per decode batch size (1, 16, 64 rows, 264 cached tokens each): CUDA graphs (one
captured graph per batch size, ORT `enable_cuda_graph`; inputs updated in place) vs no graphs:
step latency p50/p99, tokens/s, host CPU per step; plus one 512-token prefill call.
Without CUDAExecutionProvider it returns a skip note at once (nothing is built).

    python bench/_gpu_generate.py --device cpu   # a quick smoke test of the same code path
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BLOCK = 16
PAST = 264
SMOLLM2_SHAPES = {
    "n_layers": 30, "d_model": 576, "d_ff": 1536, "n_heads": 9, "n_kv_heads": 3,
    "vocab_size": 49152, "context_length": 8192, "rope_freq_base": 100000.0,
    "rms_norm_eps": 1e-5,
}  # fmt: skip


def decoder_path(work: Path, small: bool) -> tuple[Path, dict[str, Any], str]:
    """A decoder.onnx, its config and where it came from."""
    from engine.generate.build import default_cache_dir, model_dir_name

    converted = default_cache_dir() / "smollm2" / model_dir_name("fp32")
    if not small and (converted / "decoder.onnx").is_file():
        meta = json.loads((converted / "generation.json").read_text())
        return converted / "decoder.onnx", meta["config"], f"SmolLM2 converted ({converted})"
    from engine.generate.gguf_model import LlamaConfig, LlamaWeights, TokenizerData
    from engine.generate.onnx_export import build_decoder, save_decoder

    shapes = dict(SMOLLM2_SHAPES)
    if small:
        shapes.update(n_layers=2, vocab_size=4096)
    config = LlamaConfig(**shapes)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    d, f, kv = config.d_model, config.d_ff, config.n_kv_heads * config.head_dim

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    def layer() -> dict[str, np.ndarray]:
        ones = np.ones(d, np.float32)
        names = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        shapes = ((d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f))
        return {"attn_norm": ones, "ffn_norm": ones} | {
            name: w(*shape) for name, shape in zip(names, shapes, strict=True)
        }

    layers = [layer() for _ in range(config.n_layers)]
    tokenizer = TokenizerData("gpt2", "", [], [], [], None, None, False, None)
    weights = LlamaWeights(
        config, tokenizer, w(config.vocab_size, d), np.ones(d, np.float32), None, layers
    )
    path = work / "decoder.onnx"
    save_decoder(build_decoder(weights), path)
    label = "random weights, SmolLM2 shapes" + (" (2 layers: smoke test)" if small else "")
    return path, config.to_json(), label


class Step:
    """One decoder call's buffers for `rows` x `seq` new tokens, bound once with IOBinding."""

    def __init__(self, session: Any, config: dict[str, Any], rows: int, seq: int, device: str):
        import onnxruntime as ort

        self.session, self.rows, self.tokens = session, rows, rows * seq
        past = PAST if seq == 1 else 0
        blocks = max(1, -(-past // BLOCK))
        pool_blocks = rows * blocks + 1
        kv, hd = config["n_kv_heads"], config["d_model"] // config["n_heads"]
        host = {
            "input_ids": np.ones((rows, seq), np.int64),
            "position_ids": np.tile(np.arange(past, past + seq), (rows, 1)).astype(np.int64),
            "attention_bias": np.zeros((rows, seq, blocks * BLOCK + seq), np.float32),
            "logits_index": np.full((rows, 1), seq - 1, np.int64),
            "block_table": (1 + np.arange(rows * blocks).reshape(rows, blocks)).astype(np.int64),
        }
        if past == 0:
            host["block_table"][:] = 0
            host["attention_bias"][:, :, :BLOCK] = -1e30
        self.host = host
        self.binding = session.io_binding()
        self.values = {}
        for name, array in host.items():
            self.values[name] = ort.OrtValue.ortvalue_from_numpy(array, device, 0)
            self.binding.bind_ortvalue_input(name, self.values[name])
        for i in range(config["n_layers"]):
            for kind in ("key", "value"):
                pool = np.zeros((kv, pool_blocks, BLOCK, hd), np.float32)
                value = ort.OrtValue.ortvalue_from_numpy(pool, device, 0)
                self.values[f"pool_{kind}.{i}"] = value
                self.binding.bind_ortvalue_input(f"pool_{kind}.{i}", value)
        for out in session.get_outputs():
            if out.name == "logits":
                shape: tuple[int, ...] = (rows, 1, config["vocab_size"])
            else:
                shape = (rows, seq, kv, hd)
            value = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, device, 0)
            self.values[out.name] = value
            self.binding.bind_ortvalue_output(out.name, value)

    def run(self) -> None:
        # What a real step changes on the host; in place, so captured graphs stay valid.
        self.values["input_ids"].update_inplace(self.host["input_ids"])
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()


def measure(step: Step, seconds: float, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        step.run()
    times: list[float] = []
    cpu_started = time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        started = time.perf_counter()
        step.run()
        times.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu_started
    p50 = statistics.median(times)
    return {
        "step_ms_p50": round(p50 * 1e3, 3),
        "step_ms_p99": round(float(np.percentile(times, 99)) * 1e3, 3),
        "tokens_per_s": round(step.tokens / p50, 1),
        "host_cpu_ms_per_step": round(cpu / len(times) * 1e3, 3),
        "steps": len(times),
    }


def generation_section(device: str = "cuda", seconds: float = 2.0) -> dict[str, Any]:
    import onnxruntime as ort

    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": "no CUDAExecutionProvider in this onnxruntime build"}
    small = device == "cpu"
    work = Path(tempfile.mkdtemp(prefix="gpu_generate_"))
    started = time.perf_counter()
    path, config, source = decoder_path(work, small)
    report: dict[str, Any] = {"model": source, "build_s": round(time.perf_counter() - started, 1)}
    rows_list = (1, 4) if small else (1, 16, 64)
    results: list[dict[str, Any]] = []
    for graphs in (False, True):
        if graphs and small:
            continue  # CUDA graphs are a CUDA EP feature
        for rows in rows_list:
            options = ort.SessionOptions()
            if device == "cuda":
                provider_options = {"enable_cuda_graph": "1" if graphs else "0"}
                providers: list[Any] = [("CUDAExecutionProvider", provider_options)]
            else:
                providers = ["CPUExecutionProvider"]
            loaded = time.perf_counter()
            session = ort.InferenceSession(str(path), options, providers=providers)
            load_s = time.perf_counter() - loaded
            step = Step(session, config, rows, 1, device)
            result = {
                "config": f"{device} graphs={graphs}",
                "rows": rows,
                "load_s": round(load_s, 2),
            }
            result.update(measure(step, 0.3 if small else seconds))
            results.append(result)
            print(f"generation {result}", flush=True)
            if rows == rows_list[0] and not graphs:
                prefill = Step(session, config, 1, 64 if small else 512, device)
                timing = measure(prefill, 0.3 if small else seconds, warmup=1)
                results.append({"config": f"{device} prefill", "rows": 1, **timing})
                print(f"generation {results[-1]}", flush=True)
    report["results"] = results
    return report


def markdown(section: dict[str, Any]) -> str:
    if "skipped" in section:
        return f"\n## Generation (paged-KV decoder)\n\nskipped: {section['skipped']}\n"
    lines = [
        "\n## Generation (paged-KV decoder, IOBinding, 264 cached tokens a row)\n",
        f"model: {section['model']}\n",
        "| config | rows | step p50 ms | step p99 ms | tokens/s | host CPU ms/step |",
        "|---|---|---|---|---|---|",
    ]
    for r in section["results"]:
        lines.append(
            f"| {r['config']} | {r['rows']} | {r['step_ms_p50']} | {r['step_ms_p99']} "
            f"| {r['tokens_per_s']} | {r['host_cpu_ms_per_step']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    section = generation_section(args.device)
    print(markdown(section))
    print(json.dumps({"bench": "gpu_check_generation", **section}))
