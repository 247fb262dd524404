"""Model-level benchmark: dense vs sparsified end to end, planned per layer, outputs compared.

    python -m bench.bench_models [--quick] [--models decoder_block,encoder,resnet50] [--variants ...] [--rep N]

Models: a LLaMA-shaped decoder block in decode (T = 1, batch 1/4/16), a BERT-style encoder (seq 128) and
ResNet-50. Variants: dense, 2:4, unstructured 90%, channel 50% (ResNet: physically slimmed with
``sparsecore.channel.slim`` where the graph allows, the rest in channel format). Every sparse variant is
planned (``sparsecore.plan``) on the very input it is timed on, so a layer runs sparse only where that
measured faster than dense. Per row (vocabulary in ``bench.common``; ``provider`` is the variant,
``sparsity_pct`` its nominal share pruned): median latency ``time_ms`` (CUDA: ``sparsecore.timing.time_ms``;
CPU: all variants timed round-robin, ``time_interleaved_ms``), ``speedup_vs_best_dense`` against the dense
model in the same run (``best_dense_time_ms``). On CUDA each model is also captured in a CUDA graph
(``sparsecore.timing.capture_cuda_graph``; sparse variants re-planned with ``cuda_graphs=True``, so
launch cost no longer counts) and its replay timed: ``graph_time_ms``, ``graph_speedup_vs_dense_graph``
(against the dense model's graph in the same run), ``graph_backends``, ``graph_agrees`` (replay output
against the float64 reference), or ``graph_error`` when capture failed. Memory
(GPU: peak allocated during a forward pass plus resident model bytes; CPU: parameter + buffer +
backend-state bytes), and the max abs error against the masked dense model run
in float64 (the dense row: against itself in float64, the yardstick of the dtype's rounding).
fp16 on GPU, fp32 on CPU; GPU dims are the real ones, CPU dims reduced. Eager rows are timed under
``torch.no_grad()``, as the planner measures. ``--batches 1,16`` replaces the batch sizes. The table is
rewritten after every batch; a variant that fails to build, plan or run gets a row with the reason in
``error`` (and the bench exits 1).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

import sparsecore as sc
from sparsecore.models.resnet import resnet50
from sparsecore.models.transformer import DecoderBlock, encoder
from sparsecore.pruning.base import masked_copy
from sparsecore.pruning.magnitude import FilterFn

from sparsecore.timing import capture_cuda_graph, time_interleaved_ms, time_ms

from .common import BEST_DENSE_MS, ERROR, SPEEDUP, TIME_MS, Table, bench_parser, env_info, ints_arg, speedup_columns

VARIANTS = {"dense": None, "2:4": sc.SparsityConfig("nm", n=2, m=4),
            "unstructured90": sc.SparsityConfig("unstructured", 0.9), "channel50": sc.SparsityConfig("channel", 0.5)}
# The sparse model agrees when max|out - ref64| <= tol * max(1, max|ref64|).
AGREE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class ModelSpec:
    """One benchmarked model: how to build it, its inputs per batch size, which layers to prune."""

    name: str
    dims: str                                           # human-readable size, e.g. "dim=4096 hidden=11008"
    build: Callable[[], nn.Module]
    make_input: Callable[[int], torch.Tensor]           # batch -> input on CPU (fp32)
    batches: tuple[int, ...]
    filter_fn: FilterFn | None = None
    slim_channels: bool = False                         # channel variant through sparsecore.channel.slim
    extra: dict = field(default_factory=dict)


def _skip_stem_and_head(mod: nn.Module, fqn: str) -> bool:
    # Usual practice for CNNs: the 3-channel stem and the classifier stay dense.
    return fqn not in ("conv1", "fc")


def specs(preset: str) -> list[ModelSpec]:
    """Model specs for ``preset``: "gpu" (real dims), "cpu" (reduced), "quick" (small), "tiny" (tests)."""
    d = {"gpu": dict(dim=4096, hidden=11008, heads=32, dec_b=(1, 4, 16), enc=(12, 768, 3072, 12), seq=128,
                     enc_b=(1, 8), width=64, img=224, res_b=(1, 32)),
         "cpu": dict(dim=1024, hidden=2752, heads=16, dec_b=(1, 4, 16), enc=(2, 384, 1536, 12), seq=128,
                     enc_b=(1,), width=32, img=112, res_b=(1,)),
         "quick": dict(dim=512, hidden=1376, heads=8, dec_b=(1, 16), enc=(1, 256, 1024, 4), seq=64,
                       enc_b=(1,), width=16, img=64, res_b=(1,)),
         "tiny": dict(dim=64, hidden=176, heads=4, dec_b=(1, 4), enc=(1, 64, 128, 4), seq=8,
                      enc_b=(2,), width=4, img=32, res_b=(1,))}[preset]
    layers, edim, ehid, eheads = d["enc"]
    return [
        ModelSpec("decoder_block", f"dim={d['dim']} hidden={d['hidden']} T=1",
                  lambda: DecoderBlock(d["dim"], d["hidden"], d["heads"]),
                  lambda b: torch.randn(b, 1, d["dim"]), d["dec_b"]),
        ModelSpec("encoder", f"layers={layers} dim={edim} hidden={ehid} seq={d['seq']}",
                  lambda: encoder(layers, edim, ehid, eheads),
                  lambda b: torch.randn(b, d["seq"], edim), d["enc_b"]),
        ModelSpec("resnet50", f"width={d['width']} image={d['img']}",
                  lambda: resnet50(num_classes=1000 if preset == "gpu" else 100, width=d["width"]),
                  lambda b: torch.randn(b, 3, d["img"], d["img"]), d["res_b"], _skip_stem_and_head, True),
    ]


def model_bytes(model: nn.Module) -> int:
    """Resident bytes: parameters, buffers and the backends' prepared state (``sparsecore.resident_bytes``)."""
    return sc.resident_bytes(model)


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def sparsity_pct(config: sc.SparsityConfig | None) -> int:
    """Nominal percent pruned: 0 for dense, ``100 * (1 - n/m)`` for N:M, the config's share otherwise."""
    if config is None:
        return 0
    return round(100 * (1 - config.n / config.m)) if config.pattern == "nm" else round(100 * config.sparsity)


def _sparse_variant(spec: ModelSpec, dense: nn.Module, config: sc.SparsityConfig, x0: torch.Tensor
                    ) -> tuple[nn.Module, nn.Module, str]:
    """(model to time, float64 reference it must match, how it was built)."""
    masks = sc.magnitude_masks(dense, config, spec.filter_fn)
    if config.pattern == "channel" and spec.slim_channels:
        from sparsecore.channel import channel_weight_masks, masked_reference, plan_slim, apply_plan
        rows = {f: m.reshape(m.shape[0], -1).any(dim=1).cpu() for f, m in masks.items()}
        cpu = copy.deepcopy(dense).float().cpu()
        # round_to=8 keeps tensor-core tiles full on GPU (it may un-prune a few channels: plan.masks says which).
        slim_plan = plan_slim(cpu, rows, x0.float().cpu(), round_to=8 if x0.is_cuda else None)
        small = apply_plan(cpu, slim_plan)
        # Layers a residual add keeps at full width carry zeroed channels: pack those in channel format.
        rest = channel_weight_masks(small, slim_plan.residual_masks, x0.float().cpu())
        small = small.to(device=x0.device, dtype=x0.dtype)
        if rest:
            sc.sparsify(small, config, masks={f: m.to(x0.device) for f, m in rest.items()})
        ref = masked_reference(cpu, slim_plan.masks, x0.float().cpu()).double().to(x0.device)
        return small, ref, f"slim+channel({len(rest)} layers)"
    sparse = sc.sparsify(copy.deepcopy(dense), config, masks=masks)
    return sparse, masked_copy(dense, masks), f"{config.pattern} format"


def _backends(entries: list) -> str:
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.chosen] = counts.get(e.chosen, 0) + 1
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "-"


@torch.no_grad()
def _graph_columns(model: nn.Module, name: str, x: torch.Tensor, want: torch.Tensor, tol: float, rep: int,
                   cache_path: Path | None) -> dict:
    """CUDA only: re-plan for graphs, capture ``model(x)``, time the replay, check its output (never raises)."""
    try:
        entries = [] if name == "dense" else sc.plan(model, (x,), use_cache=cache_path is not None,
                                                     cache_path=cache_path, rep=rep, cuda_graphs=True)
        graph, out = capture_cuda_graph(lambda: model(x), x.device)
        graph.replay()
        err = float((out.double() - want).abs().max())
        return {"graph_time_ms": time_ms(graph.replay, x.device), "graph_backends": _backends(entries),
                "graph_agrees": err <= tol, "graph_error": ""}
    except Exception as e:  # noqa: BLE001  (a row that says why beats a lost run)
        return {"graph_time_ms": "", "graph_backends": "", "graph_agrees": "",
                "graph_error": f"{type(e).__name__}: {e}"[:200]}


def _error(spec: ModelSpec, name: str, batch: int, dtype: torch.dtype, e: BaseException) -> dict:
    """The row of a variant that failed to build, plan or run at this batch: the reason, no timings."""
    print(f"!! {spec.name} b={batch} {name}: {type(e).__name__}: {e}")
    return {"model": spec.name, "dims": spec.dims, "provider": name, "batch": batch,
            "sparsity_pct": sparsity_pct(VARIANTS[name]), "dtype": str(dtype).replace("torch.", ""),
            TIME_MS: "", BEST_DENSE_MS: "", SPEEDUP: "", ERROR: f"{type(e).__name__}: {e}"[:300]}


@torch.no_grad()  # inference, as the planner measures it: no autograd bookkeeping in the eager timings
def bench_model(spec: ModelSpec, variants: Sequence[str], device: torch.device, dtype: torch.dtype, rep: int,
                log: Callable[[str], None] = print, cache_path: Path | None = None,
                graphs: bool = False, on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Rows for one model: every batch size x variant, dense first.

    ``cache_path``: the planner's decision cache. Give a fresh file per run: layers of one shape are then
    measured once in this run (as a deployment would) and no decision comes from an earlier run.
    ``graphs``: also time each variant captured in a CUDA graph (CUDA only; see the module docstring).
    ``on_rows``: called with each batch's rows as soon as they are measured (the bench writes its table).
    A sparse variant that fails to build, plan or run gets a row with the reason in ``error``.
    """
    torch.manual_seed(0)
    dense = spec.build().eval().to(device=device, dtype=dtype)
    x_plan = spec.make_input(spec.batches[0]).to(device=device, dtype=dtype)
    dense64 = copy.deepcopy(dense).double()
    built, broken = {}, {}
    for name in variants:
        if VARIANTS[name] is not None:
            t0 = time.perf_counter()
            try:
                model, ref, how = _sparse_variant(spec, dense, VARIANTS[name], x_plan)
            except Exception as e:  # noqa: BLE001  (a row that says why beats a lost run)
                broken[name] = e
                continue
            built[name] = (model.eval(), ref.eval(), how, time.perf_counter() - t0)
    rows = []
    for batch in spec.batches:
        x = spec.make_input(batch).to(device=device, dtype=dtype)
        plans, errors = {}, {**broken}
        for name in variants:
            if name != "dense" and name not in errors:
                t0 = time.perf_counter()
                try:
                    entries = sc.plan(built[name][0], (x,), use_cache=cache_path is not None, cache_path=cache_path,
                                      rep=rep)
                    built[name][0](x)  # runs at all: a failure here must not sink the interleaved timing
                except Exception as e:  # noqa: BLE001
                    errors[name] = e
                    continue
                plans[name] = (entries, time.perf_counter() - t0)
        models = {name: dense if name == "dense" else built[name][0] for name in variants if name not in errors}
        times = time_interleaved_ms({name: (lambda m=m: m(x)) for name, m in models.items()}, device, rep=rep)
        batch_rows = [_error(spec, name, batch, dtype, e) for name, e in errors.items()]
        for name in models:
            if name == "dense":
                model, ref, how, prep_s, (entries, plan_s) = dense, dense64, "nn.Linear/Conv2d", 0.0, ([], 0.0)
            else:
                (model, ref, how, prep_s), (entries, plan_s) = built[name], plans[name]
            ms, dense_ms = times[name], times["dense"]
            peak = _peak_bytes(lambda: model(x), device)
            out, want = model(x).double(), ref(x.double())
            err = float((out - want).abs().max())
            scale = float(want.abs().max())
            mb = model_bytes(model)
            row = {"model": spec.name, "dims": spec.dims, "provider": name, "how": how, "batch": batch,
                   "sparsity_pct": sparsity_pct(VARIANTS[name]), "dtype": str(dtype).replace("torch.", ""),
                   **speedup_columns(ms, dense_ms), "model_MB": mb / 2**20,
                   "peak_MB": "" if peak is None else (mb + peak) / 2**20,
                   "max_abs_err": err, "ref_max_abs": scale, "agrees": err <= AGREE[dtype] * max(1.0, scale),
                   "backends": _backends(entries), "build_s": prep_s, "plan_s": plan_s}
            batch_rows.insert(len(batch_rows) - len(errors), row)
            log(f"{spec.name:14s} b={batch:<3d} {name:15s} {ms:9.3f} ms  x{row['speedup_vs_best_dense']:.2f}  "
                f"{row['model_MB']:8.2f} MB  err {err:.2e}  [{row['backends']}]")
            if graphs and device.type == "cuda":  # after the eager row: re-planning changes the model's plan
                row.update(_graph_columns(model, name, x, want, AGREE[dtype] * max(1.0, scale), rep, cache_path))
                log(f"{'':14s} {'':5s} {name:15s} graph {row['graph_time_ms'] or '-'} ms  [{row['graph_backends']}]"
                    f" {row['graph_error']}")
        dense_graph = next(r.get("graph_time_ms") for r in batch_rows if r["provider"] == "dense")
        for row in batch_rows:
            if graphs and device.type == "cuda":
                ok = isinstance(dense_graph, float) and isinstance(row.get("graph_time_ms"), float)
                row["graph_speedup_vs_dense_graph"] = dense_graph / row["graph_time_ms"] if ok else ""
        rows += batch_rows
        if on_rows is not None:
            on_rows(batch_rows)
    return rows


def run(preset: str, models: Sequence[str], variants: Sequence[str], device: torch.device, dtype: torch.dtype,
        rep: int, log: Callable[[str], None] = print, trim_batches: bool = False, graphs: bool = False,
        batches: Sequence[int] | None = None, table: Table | None = None) -> list[dict]:
    """All rows (each carrying ``env_info``) for the chosen models and variants; ``batches`` replaces each
    model's batch sizes; ``table`` gets each batch's rows as soon as they are measured."""
    env = env_info(device)
    chosen = [s for s in specs(preset) if s.name in models]
    for s in chosen:
        if batches:
            s.batches = tuple(batches)
        elif trim_batches:  # --quick on GPU: real dims, only the smallest and largest batch
            s.batches = tuple(sorted({s.batches[0], s.batches[-1]}))
    rows: list[dict] = []

    def add(batch_rows: list[dict]) -> None:
        rows.extend({**r, **env} for r in batch_rows)
        if table is not None:
            table.add({**r, **env} for r in batch_rows)

    with tempfile.TemporaryDirectory() as tmp:
        for spec in chosen:
            cache = Path(tmp) / "plans.json"
            try:
                bench_model(spec, variants, device, dtype, rep, log, cache, graphs, on_rows=add)
            except Exception as e:  # noqa: BLE001  (the dense model itself failed: one row, then the next model)
                add([_error(spec, "dense", spec.batches[0], dtype, e)])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = bench_parser("bench.bench_models", __doc__.split("\n")[0], "small dims, fewer repetitions")
    p.add_argument("--preset", choices=("gpu", "cpu", "quick", "tiny"),
                   help="model dims (default: gpu on CUDA, cpu otherwise; quick with --quick on CPU)")
    p.add_argument("--models", default="decoder_block,encoder,resnet50")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="default: float16 on GPU, float32 on CPU")
    p.add_argument("--rep", type=int, help="timed repetitions on CPU (CUDA uses do_bench)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-graphs", action="store_true", help="CUDA: skip the CUDA-graph replay timings")
    p.add_argument("--batches", type=ints_arg, help="batch sizes for every model (default: the preset's)")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(p, args)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another process (sparsecore bench, tests)


def _main(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    on_gpu = device.type == "cuda"
    preset = args.preset or ("gpu" if on_gpu else ("quick" if args.quick else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if on_gpu else torch.float32)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = {s.name for s in specs(preset)}
    for bad in [m for m in models if m not in known] + [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown model or variant {bad!r}; models {sorted(known)}, variants {list(VARIANTS)}")
    if "dense" not in variants:
        variants.insert(0, "dense")  # the speedup needs the dense row of the same run
    rep = args.rep or (5 if args.quick else 20)
    if not on_gpu:
        print("CPU run: reduced dims; Triton backends need CUDA and are skipped by the planner")
    suffix = "" if preset in ("gpu", "cpu") else f"_{preset}"
    table = Table("models" + suffix, device, args.out_dir)
    run(preset, models, variants, device, dtype, rep, trim_batches=args.quick and preset == "gpu",
        graphs=on_gpu and not args.no_graphs, batches=args.batches, table=table)
    print(f"wrote {table.path}")
    bad = [r for r in table.rows if r.get(ERROR)]
    if bad:
        print(f"!! {len(bad)} variant(s) failed: {sorted({(r['model'], r['provider']) for r in bad})}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
