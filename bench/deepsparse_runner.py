"""Times an ONNX model in DeepSparse and in ONNX Runtime; run by ``bench.cpu_e2e`` in DeepSparse's own venv.

    <venv>/bin/python bench/deepsparse_runner.py MODEL.onnx --batch 1 --seq 128 --reps 20 --repeats 3

Standalone (numpy, deepsparse, onnxruntime only: no torch, no sparsecore). Inputs: ``input_ids`` (int64
random tokens below 1000) and ``attention_mask`` (ones), both ``[batch, seq]``. Prints one JSON object:
``{"deepsparse": [median ms per repeat], "onnxruntime": [...], "versions": {...}}``; a runtime that fails
gives ``"<name>_error"`` instead.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def _repeat_medians(fn, repeats: int, reps: int) -> list[float]:
    for _ in range(3):
        fn()
    out = []
    for _ in range(repeats):
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        out.append(statistics.median(samples))
    return out


def main() -> None:
    import numpy as np

    p = argparse.ArgumentParser()
    p.add_argument("onnx")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (a.batch, a.seq), dtype=np.int64)
    mask = np.ones((a.batch, a.seq), dtype=np.int64)
    result: dict = {"versions": {}}
    try:
        import deepsparse
        result["versions"]["deepsparse"] = deepsparse.__version__
        engine = deepsparse.compile_model(a.onnx, batch_size=a.batch, num_cores=a.threads or None)
        result["deepsparse"] = _repeat_medians(lambda: engine.run([ids, mask]), a.repeats, a.reps)
    except Exception as e:  # noqa: BLE001  (reported as a row, never fatal)
        result["deepsparse_error"] = f"{type(e).__name__}: {e}"[:300]
    try:
        import onnxruntime as ort
        result["versions"]["onnxruntime"] = ort.__version__
        opts = ort.SessionOptions()
        if a.threads:
            opts.intra_op_num_threads = a.threads
        sess = ort.InferenceSession(a.onnx, opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feed = dict(zip(names, (ids, mask)))
        result["onnxruntime"] = _repeat_medians(lambda: sess.run(None, feed), a.repeats, a.reps)
    except Exception as e:  # noqa: BLE001
        result["onnxruntime_error"] = f"{type(e).__name__}: {e}"[:300]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
