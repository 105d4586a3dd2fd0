"""llama-cpp-python side of bench/generate.py, run with bench/.venv-llamacpp/bin/python.

Reads a JSON job on stdin: {"gguf", "threads", "new_tokens", "runs": [[prompt, ...], ...],
"ban": [token ids never to sample: the model's stop tokens, for fixed-length answers]};
each run's prompts all arrive at once and are served one at a time (llama.cpp's Python
binding has no batching across requests), greedy. Prints one JSON result per run: tokens,
wall seconds, process CPU seconds, time to first token of every request (from the run's
start, so later requests include their wait), plus the load time.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main() -> None:
    job = json.load(sys.stdin)
    started = time.perf_counter()
    from llama_cpp import Llama

    llm = Llama(
        model_path=job["gguf"],
        n_ctx=2048,
        n_batch=512,
        n_threads=job["threads"],
        n_threads_batch=job["threads"],  # default: every core, spinning
        verbose=False,
    )
    load_s = time.perf_counter() - started
    ban = list(job.get("ban", []))
    for _ in llm.create_completion("Hello", max_tokens=4, temperature=0.0, stream=True):
        pass  # warm-up
    results = []
    for prompts in job["runs"]:
        cpu_started = time.process_time()
        run_started = time.perf_counter()
        ttft, tokens = [], 0
        for prompt in prompts:
            llm.reset()  # no KV reuse between different requests, like a fresh request
            first = None
            if ban:  # greedy by hand, the banned ids masked (create_completion's logit_bias
                # runs a Python processor over the whole vocabulary per token: 2.5x slower)
                ids = llm.tokenize(prompt.encode(), special=True)
                for _ in range(job["new_tokens"]):
                    llm.eval(ids)
                    logits = np.array(llm.scores[llm.n_tokens - 1], copy=True)
                    logits[ban] = -np.inf
                    ids = [int(np.argmax(logits))]
                    if first is None:
                        first = time.perf_counter() - run_started
                    tokens += 1
            else:
                for chunk in llm.create_completion(
                    prompt, max_tokens=job["new_tokens"], temperature=0.0, stream=True
                ):
                    if first is None:
                        first = time.perf_counter() - run_started
                    tokens += 1 if chunk["choices"][0]["text"] is not None else 0
            ttft.append(first if first is not None else time.perf_counter() - run_started)
        results.append(
            {
                "tokens": tokens,
                "wall_s": time.perf_counter() - run_started,
                "cpu_s": time.process_time() - cpu_started,
                "ttft": ttft,
            }
        )
    print(json.dumps({"load_s": load_s, "results": results}))


if __name__ == "__main__":
    main()
