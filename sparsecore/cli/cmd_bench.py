"""``sparsecore bench FILE``: latency of a pruned model file against its dense self on this machine.

The file's recorded skeleton (``sparsecore prune`` writes it) gives the dense model; the sparse one is loaded
from the file and planned for the batch size asked. Both run the same random input, interleaved in pairs;
the table gives medians with quartiles and the speedup's spread, and one CSV row per run goes to ``--out``
(default: ``<file stem>.bench.csv`` in the current directory). Kernel sweeps over shapes are not user-model
benchmarks: they live in the repository's ``bench/`` folder (``python -m bench.bench_nm`` and others, run
from a source checkout).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import platform
from collections import Counter
from pathlib import Path

import torch

from . import zoo
from .cmd_prune import DTYPES
from .errors import CLIError, check_device, check_readable_file, check_writable, positive
from .table import fixed_width

COLUMNS = ("file", "model", "batch", "device", "dtype", "dense_ms", "dense_q1_ms", "dense_q3_ms", "sparse_ms",
           "sparse_q1_ms", "sparse_q3_ms", "speedup", "speedup_q1", "speedup_q3", "pairs", "backends",
           "torch", "sparsecore", "cpu_threads", "machine", "date")


def add_arguments(be: argparse.ArgumentParser) -> None:
    be.add_argument("file", help="a file written by `sparsecore prune` (it records how to rebuild the model)")
    be.add_argument("--batch", type=positive, default=1, help="batch size to plan and time (default 1)")
    be.add_argument("--seq", type=positive, default=128, help="sequence length of encoder / transformers inputs")
    be.add_argument("--image-size", type=positive, default=224, help="image side of conv nets' input (224)")
    be.add_argument("--rep", type=positive, default=30, help="timed pairs (dense, sparse) (default 30)")
    be.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    be.add_argument("--out", help="CSV file for the result row (default: <file stem>.bench.csv in the cwd)")
    be.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sparsecore as sc
    from ..compare import compare_latency
    from ..io import read
    from ..sparsify import sparse_modules

    src = check_readable_file(args.file, "bench:")
    out = check_writable(args.out or Path.cwd() / f"{src.name.split('.')[0]}.bench.csv")
    device = check_device(args.device)
    extra = read(src).header.get("extra")
    spec = zoo.spec_of_file(extra, src)
    dtype_name = (extra or {}).get("skeleton", {}).get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise CLIError(f"{src}: recorded dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
    dtype = DTYPES[dtype_name]

    dense = zoo.build(spec).to(device=device, dtype=dtype)
    sparse = sc.load(src, zoo.build(spec)).to(device)
    x = zoo.example_inputs(spec, dense, args.batch, dtype, device, args.seq, args.image_size)
    decisions = sc.plan(sparse, x)
    result = compare_latency(dense, sparse, x, rep=args.rep)
    used = Counter(d.chosen for d in decisions)
    backends = " ".join(f"{b}:{n}" for b, n in sorted(used.items())) or "none planned"

    print(f"{src} ({spec.source} {spec.name}, {len(sparse_modules(sparse))} sparse layers) on {device}, "
          f"batch {args.batch}, {dtype_name}, {args.rep} interleaved pairs")
    print(fixed_width([
        ["", "median", "q1", "q3"],
        ["dense ms", f"{result.dense_ms:.3f}", f"{result.dense_q1_ms:.3f}", f"{result.dense_q3_ms:.3f}"],
        ["sparse ms", f"{result.sparse_ms:.3f}", f"{result.sparse_q1_ms:.3f}", f"{result.sparse_q3_ms:.3f}"],
        ["speedup", f"{result.ratio:.2f}x", f"{result.ratio_q1:.2f}x", f"{result.ratio_q3:.2f}x"]]))
    print(f"backends: {backends}")
    row = {"file": str(src), "model": f"{spec.source}:{spec.name}", "batch": args.batch, "device": str(device),
           "dtype": dtype_name, "dense_ms": result.dense_ms, "dense_q1_ms": result.dense_q1_ms,
           "dense_q3_ms": result.dense_q3_ms, "sparse_ms": result.sparse_ms, "sparse_q1_ms": result.sparse_q1_ms,
           "sparse_q3_ms": result.sparse_q3_ms, "speedup": result.ratio, "speedup_q1": result.ratio_q1,
           "speedup_q3": result.ratio_q3, "pairs": result.pairs, "backends": backends,
           "torch": torch.__version__, "sparsecore": sc.__version__, "cpu_threads": torch.get_num_threads(),
           "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
           or platform.machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerow(row)
    print(f"wrote {out}")
    return 0
