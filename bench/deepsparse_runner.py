"""DeepSparse and ONNX Runtime on one ONNX model: a self-timing worker that ``bench.cpu_e2e`` interleaves.

    <venv>/bin/python bench/deepsparse_runner.py MODEL.onnx --batch 1 --seq 128 [--threads N]
                                                 [--runtimes deepsparse,onnxruntime]

Standalone (numpy, deepsparse, onnxruntime only: no torch, no sparsecore), so it runs in DeepSparse's own
venv. Inputs: ``input_ids`` (int64 random tokens below 1000) and ``attention_mask`` (ones), both
``[batch, seq]``, made once. Protocol, one line per message (``bench.worker_client`` speaks the other side):

* worker -> bench, once, after every runtime has loaded the model and run it ``WARMUP`` times:
  ``{"ready": [names], "errors": {name: why}, "versions": {name: version}}`` (JSON). A runtime that fails to
  load is in ``errors``, not in ``ready``.
* bench -> worker ``run NAME``: the worker calls NAME once and answers the wall time of that one call in
  ms (``perf_counter`` around the runtime's call only: the pipe round trip is not in it), e.g. ``7.412``;
  ``error <why>`` when the call raised or NAME is not ready.
* bench -> worker ``quit``, or end of input: the worker exits.

Anything the runtimes print goes to stderr: stdout carries the protocol only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, TextIO

WARMUP = 3
RUNTIMES = ("deepsparse", "onnxruntime")


def load(name: str, onnx: str, batch: int, threads: int, ids, mask) -> tuple[Callable[[], object], str]:
    """``(call, version)``: one inference of the model in runtime ``name`` on fixed inputs."""
    if name == "deepsparse":
        import deepsparse
        engine = deepsparse.compile_model(onnx, batch_size=batch, num_cores=threads or None)
        return (lambda: engine.run([ids, mask])), deepsparse.__version__
    if name == "onnxruntime":
        import onnxruntime as ort
        opts = ort.SessionOptions()
        # Its pool keeps spinning for tens of ms after a call by default, stealing the cores of whatever runs
        # next; this stops the spinning when a call returns (it still spins within a call).
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        if threads:
            opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])
        feed = dict(zip([i.name for i in sess.get_inputs()], (ids, mask)))
        return (lambda: sess.run(None, feed)), ort.__version__
    raise ValueError(f"unknown runtime {name!r}; expected one of {RUNTIMES}")


def serve(calls: dict[str, Callable[[], object]], commands: TextIO, answers: TextIO) -> None:
    """Answer ``run NAME [N]`` with the wall times in ms of N (default 1) back-to-back calls, space-separated,
    until ``quit`` or end of input."""
    for line in commands:
        tokens = line.split()
        verb, name, rest = (tokens + ["", ""])[0], (tokens + ["", ""])[1], tokens[2:]
        if verb == "quit":
            return
        count = int(rest[0]) if len(rest) == 1 and rest[0].isdigit() and int(rest[0]) > 0 else (1 if not rest else 0)
        if verb != "run" or name not in calls or count == 0:
            answers.write(f"error expected 'run NAME [N]' with NAME in {sorted(calls)} and N >= 1, or 'quit', got "
                          f"{line.strip()!r}\n")
        else:
            try:
                times = []
                for _ in range(count):
                    t0 = time.perf_counter()
                    calls[name]()
                    times.append((time.perf_counter() - t0) * 1e3)
                answers.write(" ".join(f"{ms:.6f}" for ms in times) + "\n")
            except Exception as e:  # noqa: BLE001  (the bench turns it into an error row)
                answers.write("error " + f"{type(e).__name__}: {e}".replace("\n", " ")[:300] + "\n")
        answers.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("onnx")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--threads", type=int, default=0, help="threads per runtime (0: the runtime's default)")
    p.add_argument("--runtimes", default=",".join(RUNTIMES))
    a = p.parse_args()
    # The protocol gets its own copy of stdout; fd 1 then points at stderr, so banners and logs that the
    # runtimes print (Python or native) cannot be mistaken for answers.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import numpy as np
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (a.batch, a.seq), dtype=np.int64)
    mask = np.ones((a.batch, a.seq), dtype=np.int64)
    calls: dict[str, Callable[[], object]] = {}
    errors: dict[str, str] = {}
    versions: dict[str, str] = {}
    for name in [r.strip() for r in a.runtimes.split(",") if r.strip()]:
        try:
            call, versions[name] = load(name, a.onnx, a.batch, a.threads, ids, mask)
            for _ in range(WARMUP):
                call()
            calls[name] = call
        except Exception as e:  # noqa: BLE001  (reported in the ready line, never fatal)
            errors[name] = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
    answers.write(json.dumps({"ready": sorted(calls), "errors": errors, "versions": versions}) + "\n")
    answers.flush()
    serve(calls, sys.stdin, answers)


if __name__ == "__main__":
    main()
