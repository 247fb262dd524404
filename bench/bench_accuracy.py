"""Accuracy vs sparsity of every pruning method on offline data (scikit-learn digits, mnist1d), CPU.

    python -m bench.bench_accuracy [--quick]
    python -m bench.bench_accuracy --large-sparse [--quick]

For each dataset x model (MLP, small CNN): train dense, then start every method from that same dense model
with the same fine-tuning budget (epochs): one-shot magnitude + fine-tune (reference), GMP, PDP, SAP (PQ
Index rounds, one epoch of fine-tuning per round; its sparsity is whatever the rounds reach), SNACS
(single shot + fine-tune), PSAP (channel only). Patterns: unstructured 50-95%, 2:4, channel 25-75% of the
hidden layers' output channels (the classifier is never channel-pruned). The dense row gets the same extra
epochs. Writes ``bench/results/accuracy_<device>.{csv,md}``, ``accuracy_sap_rounds_<device>.{csv,md}`` and
two PNG plots. Everything is generated locally; nothing is downloaded.

``--large-sparse`` runs only Zhu & Gupta's claim instead: dense MLPs of several widths vs wider MLPs pruned
by GMP (cubic, from scratch, same epochs/optimiser/batches) to each narrower model's non-zero count of Linear
weights (within 2%), 3 seeds; writes ``accuracy_large_sparse[_runs]_<device>.{csv,md}`` and a plot.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.common import RESULTS, env_info, slug, device_name, write_table
from sparsecore.masks import as_matrix, keep_count
from sparsecore.models.small import MLP, SmallCNN
from sparsecore.pruning import (GMP, PDP, PSAP, SAP, FixedMasks, balanced_indices, evaluate, magnitude_masks,
                                snacs_masks, snacs_scores, train)
from sparsecore.config import SparsityConfig

DEVICE = "cpu"


@dataclass
class Budget:
    pretrain: int
    finetune: int
    sap_rounds: int
    unstructured: tuple[float, ...]
    channel: tuple[float, ...]


FULL = Budget(pretrain=30, finetune=12, sap_rounds=20, unstructured=(0.5, 0.7, 0.9, 0.95), channel=(0.25, 0.5, 0.75))
QUICK = Budget(pretrain=8, finetune=4, sap_rounds=6, unstructured=(0.5, 0.9), channel=(0.5,))


def load_data(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) as float32 / int64 tensors, generated or shipped locally."""
    if name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        cut = int(0.8 * len(y))
        return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]
    from mnist1d.data import get_dataset_args, make_dataset
    d = make_dataset(get_dataset_args())  # procedural: 4000 train / 1000 test, seed 42
    return (torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"]),
            torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"]))


def make_model(dataset: str, kind: str) -> nn.Module:
    if dataset == "digits":
        return MLP(64, 10, (128, 64)) if kind == "mlp" else SmallCNN((1, 8, 8), 10)
    return MLP(40, 10, (256, 128)) if kind == "mlp" else SmallCNN((1, 1, 40), 10, kernel=(1, 5), pool=(1, 2))


def batches(x: torch.Tensor, y: torch.Tensor, bs: int, seed: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if seed is not None else torch.arange(len(y))
    return [(x[idx[i:i + bs]], y[idx[i:i + bs]]) for i in range(0, len(y), bs)]


class Loader:
    """Re-shuffles every epoch (a fresh, seeded order each time it is iterated)."""

    def __init__(self, x, y, bs=64, seed=0):
        self.x, self.y, self.bs, self.seed = x, y, bs, seed

    def __iter__(self):
        self.seed += 1
        return iter(batches(self.x, self.y, self.bs, self.seed))

    def __len__(self):
        return (len(self.y) + self.bs - 1) // self.bs


def hidden(mod: nn.Module, fqn: str) -> bool:
    return fqn != "head"


def weight_sparsity(model: nn.Module) -> float:
    ws = [m.weight for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)]
    return float(sum(int((w == 0).sum()) for w in ws)) / sum(w.numel() for w in ws)


def channel_sparsity_of(model: nn.Module) -> float:
    ws = [m.weight for f, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and f != "head"]
    return sum(int((~as_matrix(w != 0).any(1)).sum()) for w in ws) / sum(w.shape[0] for w in ws)


def run_method(method, pattern, s, base, loader, test, budget, snacs_cache):
    """Prune + fine-tune a copy of ``base``; returns (model, accuracy before fine-tuning or None)."""
    model = copy.deepcopy(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    epochs, steps = budget.finetune, budget.finetune * len(loader)
    filt = hidden if pattern == "channel" else None
    nm_or = "nm" if pattern == "2:4" else pattern
    before = None
    if method == "dense":
        train(model, loader, epochs, optimizer=opt)
    elif method in ("magnitude", "snacs"):
        if method == "magnitude":
            cfg = SparsityConfig(nm_or, s if pattern != "2:4" else 0.5)
            masks = magnitude_masks(model, cfg, filt)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                masks = snacs_masks(model, snacs_cache, s).masks
        fixed = FixedMasks(model, masks, zero_bias=pattern == "channel")
        before = evaluate(model, test)
        train(model, loader, epochs, fixed, optimizer=opt)
    elif method == "gmp":
        n_upd = 10
        dt = max(1, int(0.6 * steps) // n_upd)
        pruner = GMP(model, s if pattern != "2:4" else 0.5, t0=0, n=n_upd, dt=dt, pattern=nm_or, filter_fn=filt)
        train(model, loader, epochs, pruner, optimizer=opt)
    elif method == "pdp":
        ramp = max(1, int(0.6 * epochs))
        pruner = PDP(model, s if pattern != "2:4" else 0.5, pattern=nm_or, warmup=0, eps=1.0 / ramp, filter_fn=filt)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        train(model, loader, ramp, pruner, optimizer=opt)
        pruner.finalize()
        train(model, loader, epochs - ramp, pruner, optimizer=opt)
    elif method == "psap":
        n_steps = max(1, int(0.6 * epochs))
        targets = [s * (i + 1) / n_steps for i in range(n_steps)]
        pruner = PSAP(model, targets=targets, filter_fn=filt)
        train(model, loader, n_steps, pruner, optimizer=opt)
        pruner.finalize()
        train(model, loader, epochs - n_steps, pruner, optimizer=opt)
    else:
        raise ValueError(method)
    return model, before


def run_sap(base, pattern, loader, test, budget):
    """SAP rounds (layer scope, defaults p=0.5, q=1) with one epoch of fine-tuning each; per-round records."""
    model = copy.deepcopy(base)
    sap = SAP(model, pattern=pattern, filter_fn=hidden if pattern == "channel" else None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = []
    for rnd in range(budget.sap_rounds):
        sap.prune_round()
        train(model, loader, 1, sap, optimizer=opt)
        sp = channel_sparsity_of(model) if pattern == "channel" else weight_sparsity(model)
        out.append({"round": rnd, "pqi": sap.history[-1]["pqi"], "sparsity": sp, "acc": evaluate(model, test)})
    return out


# --- Large-sparse vs small-dense at equal non-zero count (Zhu & Gupta 2017's claim) ---------------------------


@dataclass(frozen=True)
class LargeSparseSetup:
    """One data set: dense MLPs of the ``small`` widths vs MLPs of each ``large`` width pruned by GMP to the
    non-zero count of every narrower small model (dense rows too for large widths not among ``small``).
    Every MLP has two hidden layers of the same width."""
    dataset: str
    small: tuple[int, ...]
    large: tuple[int, ...]


@dataclass(frozen=True)
class LargeSparseBudget:
    setups: tuple[LargeSparseSetup, ...]
    epochs: int
    seeds: tuple[int, ...]
    prune_window: tuple[float, float] = (0.1, 0.6)  # GMP prunes from 10% to 60% of all steps, then fine-tunes
    updates: int = 20                                # mask updates in that window (n of the schedule)
    tolerance: float = 0.02                          # non-zero counts must match within 2%


LS_FULL = LargeSparseBudget(setups=(LargeSparseSetup("digits", (16, 32, 64, 128), (64, 128, 256)),
                                    LargeSparseSetup("mnist1d", (16, 32, 64, 128), (64, 128, 256))),
                            epochs=40, seeds=(0, 1, 2))
LS_QUICK = LargeSparseBudget(setups=(LargeSparseSetup("digits", (16, 64), (128,)),), epochs=8, seeds=(0, 1))


def mlp_for(dataset_features: int, width: int) -> MLP:
    """The MLP of the large-sparse experiment: ``features -> width -> width -> 10``."""
    return MLP(dataset_features, 10, (width, width))


def linear_weight_counts(model: nn.Module) -> list[int]:
    """numel of every Linear weight (biases excluded), in module order."""
    return [m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)]


def linear_nonzeros(model: nn.Module) -> int:
    """Non-zero entries over all Linear weights (biases excluded)."""
    return sum(int((m.weight != 0).sum()) for m in model.modules() if isinstance(m, nn.Linear))


def matching_sparsity(counts: list[int], target: int, tolerance: float = 0.02) -> float:
    """Layer-uniform sparsity s at which layers of ``counts`` weights keep ``target`` in total (GMP's rule:
    each layer keeps ``keep_count(n_l, s)``); raises ValueError when the kept total misses by more than
    ``tolerance`` (relative) or ``target`` exceeds the weights available.

    >>> matching_sparsity([100, 100], 50)
    0.75
    """
    total = sum(counts)
    if not 0 < target <= total:
        raise ValueError(f"target non-zero count must lie in (0, {total}], got {target}")
    s = 1.0 - target / total
    kept = sum(keep_count(n, s) for n in counts)
    if abs(kept - target) > tolerance * target:
        raise ValueError(f"sparsity {s:.4f} keeps {kept} weights, more than {tolerance:.0%} away from {target}")
    return s


def train_large_sparse(width: int, sparsity: float, xtr: torch.Tensor, ytr: torch.Tensor, test: list,
                       epochs: int, seed: int, budget: LargeSparseBudget) -> tuple[float, int, float]:
    """Train an MLP of ``width`` from scratch for ``epochs`` (Adam 1e-3, batch 64, seeded order); GMP
    (cubic, layer-wise over every Linear incl. the head) prunes it to ``sparsity`` when > 0.
    Returns (test accuracy, Linear non-zeros, actual sparsity)."""
    torch.manual_seed(seed)
    model = mlp_for(xtr.shape[1], width)
    loader = Loader(xtr, ytr, seed=1000 * seed)  # same seed -> same batches for small and large
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner = None
    if sparsity > 0:
        steps = epochs * len(loader)
        t0 = int(budget.prune_window[0] * steps)
        dt = max(1, int((budget.prune_window[1] - budget.prune_window[0]) * steps) // budget.updates)
        pruner = GMP(model, sparsity, t0=t0, n=budget.updates, dt=dt)
    train(model, loader, epochs, pruner, optimizer=opt)
    if pruner is not None and not pruner.frozen:
        raise RuntimeError(f"GMP window did not finish within {epochs} epochs (t0={pruner.t0}, dt={pruner.dt})")
    nnz, total = linear_nonzeros(model), sum(linear_weight_counts(model))
    return evaluate(model, test), nnz, 1.0 - nnz / total


def _spread(vals: list[float]) -> float:
    return float(torch.tensor(vals, dtype=torch.float64).std()) if len(vals) > 1 else 0.0


def run_large_sparse(budget: LargeSparseBudget, out_dir: Path | None = None,
                     suffix: str = "") -> tuple[list[dict], list[dict]]:
    """Run the experiment; writes ``accuracy_large_sparse{suffix}_<device>.{csv,md}`` (mean +- std over
    seeds), ``accuracy_large_sparse_runs{suffix}_<device>.{csv,md}`` (one row per seed) and a PNG plot to
    ``out_dir`` (default bench/results). Returns (summary rows, per-seed rows)."""
    env = env_info(DEVICE)
    runs, summary = [], []
    for setup in budget.setups:
        xtr, ytr, xte, yte = load_data(setup.dataset)
        test = batches(xte, yte, 512, None)
        dense_accs: dict[int, list[float]] = {}  # small width -> per-seed accuracy (the pairing reference)
        count = lambda w: linear_weight_counts(mlp_for(xtr.shape[1], w))  # noqa: E731
        plan = [("small-dense", w, w, 0.0) for w in setup.small]
        plan += [("large-dense", w, w, 0.0) for w in setup.large if w not in setup.small]
        plan += [("large-sparse", big, w, matching_sparsity(count(big), sum(count(w)), budget.tolerance))
                 for big in setup.large for w in setup.small if w < big]
        for model_kind, width, matched, s in plan:
            target = sum(count(matched))
            accs = []
            for seed in budget.seeds:
                t0 = time.time()
                acc, nnz, actual = train_large_sparse(width, s, xtr, ytr, test, budget.epochs, seed, budget)
                if abs(nnz - target) > budget.tolerance * target:
                    raise RuntimeError(f"{setup.dataset} {model_kind} w={width}: {nnz} non-zeros vs target {target}")
                accs.append(100 * acc)
                runs.append({"data": setup.dataset, "model": model_kind, "width": width, "matched_width": matched,
                             "seed": seed, "sparsity_%": round(100 * actual, 2), "nonzeros": nnz,
                             "test_acc_%": round(100 * acc, 2), "time_s": round(time.time() - t0, 2), **env})
            mean, std = sum(accs) / len(accs), _spread(accs)
            row = {"data": setup.dataset, "model": model_kind, "width": width, "matched_width": matched,
                   "sparsity_%": runs[-1]["sparsity_%"], "nonzeros": runs[-1]["nonzeros"],
                   "nonzeros_vs_target_%": round(100 * (runs[-1]["nonzeros"] - target) / target, 3),
                   "biases": 2 * width + 10, "test_acc_%": f"{mean:.2f} ± {std:.2f}",
                   "test_acc_mean_%": round(mean, 2), "test_acc_std_%": round(std, 2),
                   "test_acc_min_%": round(min(accs), 2), "test_acc_max_%": round(max(accs), 2),
                   "seeds": len(accs), "epochs": budget.epochs, "delta_vs_small_dense_pts": "", "seeds_ahead": ""}
            if model_kind == "small-dense":
                dense_accs[width] = accs
            elif model_kind == "large-sparse":  # paired by seed: same data order and test set
                diffs = [a - b for a, b in zip(accs, dense_accs[matched])]
                row["delta_vs_small_dense_pts"] = f"{sum(diffs) / len(diffs):+.2f} ± {_spread(diffs):.2f}"
                row["seeds_ahead"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
            summary.append({**row, **env})
            print(f"{setup.dataset:8s} {model_kind:12s} w={width:4d} s={100 * s:6.2f}% nnz={row['nonzeros']:6d} "
                  f"acc={row['test_acc_%']} {row['delta_vs_small_dense_pts']}", flush=True)
    md = write_table("accuracy_large_sparse" + suffix, summary, DEVICE, out_dir)
    write_table("accuracy_large_sparse_runs" + suffix, runs, DEVICE, out_dir)
    plot_large_sparse(summary, md.with_suffix(".png"))
    return summary, runs


def plot_large_sparse(summary: list[dict], path: Path) -> None:
    """Accuracy (mean, std error bars) vs Linear non-zeros, one panel per data set: the small-dense line, one
    large-sparse line per large width (points labelled with their sparsity) and the large-dense models."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = list(dict.fromkeys(r["data"] for r in summary))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.6 * len(datasets), 4.0), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        mine = [r for r in summary if r["data"] == ds]
        larges = sorted({r["width"] for r in mine if r["model"] == "large-sparse"})
        lines = [("small-dense", None, "tab:gray", "small-dense (width labelled)")]
        lines += [("large-sparse", w, plt.cm.Blues(0.45 + 0.5 * i / max(1, len(larges) - 1)), f"width {w} + GMP")
                  for i, w in enumerate(larges)]
        for kind, width, color, label in lines:
            pts = sorted((r["nonzeros"], r["test_acc_mean_%"], r["test_acc_std_%"], r["width"], r["sparsity_%"])
                         for r in mine if r["model"] == kind and width in (None, r["width"]))
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", ms=4,
                        capsize=3, color=color, label=label)
            for n, acc, _, w, sp in pts:
                ax.annotate(str(w) if kind == "small-dense" else f"{sp:.0f}%", (n, acc), fontsize=6, color=color,
                            textcoords="offset points", xytext=(4, -10 if kind == "small-dense" else 4))
        dense = [r for r in mine if r["model"] == "large-dense"]
        ax.errorbar([r["nonzeros"] for r in dense], [r["test_acc_mean_%"] for r in dense],
                    yerr=[r["test_acc_std_%"] for r in dense], marker="s", color="k", ls="none", capsize=3,
                    label="large-dense (" + ", ".join(str(r["width"]) for r in dense) + ")")
        ax.set_xscale("log")
        ax.set_xlabel("non-zero Linear weights (log scale)")
        ax.set_ylabel("test accuracy (%), mean +- std over seeds")
        ax.set_title(f"{ds}: MLP, equal non-zeros")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and sparsities (~2 minutes)")
    ap.add_argument("--large-sparse", action="store_true",
                    help="only the large-sparse vs small-dense experiment at equal non-zero count (~5 minutes)")
    args = ap.parse_args(argv)
    budget = QUICK if args.quick else FULL
    # Tiny models: one thread is ~5x faster than two on a shared 2-core machine (no sync overhead).
    torch.set_num_threads(1)
    if args.large_sparse:
        t_start = time.time()
        run_large_sparse(LS_QUICK if args.quick else LS_FULL, suffix="_quick" if args.quick else "")
        print(f"large-sparse experiment done in {time.time() - t_start:.0f} s")
        return
    env = env_info(DEVICE)
    rows, sap_rows, t_start = [], [], time.time()
    for dataset in ("digits", "mnist1d"):
        xtr, ytr, xte, yte = load_data(dataset)
        test = batches(xte, yte, 512, None)
        for kind in ("mlp", "cnn"):
            torch.manual_seed(0)
            loader = Loader(xtr, ytr)
            base = make_model(dataset, kind)
            train(base, loader, budget.pretrain)
            calib = balanced_indices(ytr, 50, torch.Generator().manual_seed(0))
            t0 = time.time()
            cache = snacs_scores(base, xtr[calib], ytr[calib], generator=torch.Generator().manual_seed(0))
            snacs_s = time.time() - t0
            plan = [("dense", "dense", 0.0)]
            plan += [(m, "unstructured", s) for m in ("magnitude", "gmp", "pdp") for s in budget.unstructured]
            plan += [(m, "2:4", 0.5) for m in ("magnitude", "gmp", "pdp")]
            plan += [(m, "channel", s) for m in ("magnitude", "gmp", "pdp", "snacs", "psap") for s in budget.channel]
            for method, pattern, s in plan:
                torch.manual_seed(1)
                t0 = time.time()
                model, before = run_method(method, pattern, s, base, loader, test, budget, cache)
                actual = channel_sparsity_of(model) if pattern == "channel" else weight_sparsity(model)
                rows.append({"dataset": dataset, "model": kind, "method": method, "pattern": pattern,
                             "target_sparsity_%": round(100 * s, 1), "actual_sparsity_%": round(100 * actual, 2),
                             "test_acc_%": round(100 * evaluate(model, test), 2),
                             "acc_before_finetune_%": "" if before is None else round(100 * before, 2),
                             "time_s": round(time.time() - t0 + (snacs_s if method == "snacs" else 0.0), 2), **env})
                print(f"{dataset:8s} {kind:4s} {method:9s} {pattern:12s} s={s:.2f} actual={actual:.3f} "
                      f"acc={rows[-1]['test_acc_%']:.2f}", flush=True)
            for pattern in ("unstructured", "channel"):
                torch.manual_seed(1)
                for r in run_sap(base, pattern, loader, test, budget):
                    sap_rows.append({"dataset": dataset, "model": kind, "pattern": pattern, "round": r["round"],
                                     "pqi": round(r["pqi"], 4), "sparsity_%": round(100 * r["sparsity"], 2),
                                     "test_acc_%": round(100 * r["acc"], 2), **env})
                mine = [r for r in sap_rows if (r["dataset"], r["model"], r["pattern"]) == (dataset, kind, pattern)]
                grid = budget.unstructured if pattern == "unstructured" else budget.channel
                picks = {min(mine, key=lambda r: abs(r["sparsity_%"] - 100 * s))["round"] for s in grid}
                picks = {k for k in picks if abs(mine[k]["sparsity_%"] - 100 * min(grid, key=lambda s: abs(
                    100 * s - mine[k]["sparsity_%"]))) <= 5} | {mine[-1]["round"]}
                for k in sorted(picks):
                    r = mine[k]
                    rows.append({"dataset": dataset, "model": kind, "method": f"sap (round {k})", "pattern": pattern,
                                 "target_sparsity_%": "", "actual_sparsity_%": r["sparsity_%"],
                                 "test_acc_%": r["test_acc_%"], "acc_before_finetune_%": "", "time_s": "", **env})
                last = sap_rows[-1]
                print(f"{dataset:8s} {kind:4s} sap       {pattern:12s} rounds={budget.sap_rounds} "
                      f"sparsity={last['sparsity_%']:.1f}% acc={last['test_acc_%']:.2f}", flush=True)
    suffix = "_quick" if args.quick else ""
    md = write_table("accuracy" + suffix, rows, DEVICE)
    write_table("accuracy_sap_rounds" + suffix, sap_rows, DEVICE)
    plot(rows, sap_rows, suffix)
    print(f"wrote {md} and plots in {time.time() - t_start:.0f} s")


def plot(rows: list[dict], sap_rows: list[dict], suffix: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    setups = sorted({(r["dataset"], r["model"]) for r in rows})
    tag = slug(device_name(DEVICE))[:40]
    colors = {"magnitude": "tab:gray", "gmp": "tab:blue", "pdp": "tab:orange", "sap": "tab:green",
              "snacs": "tab:red", "psap": "tab:purple"}
    fig, axes = plt.subplots(len(setups), 2, figsize=(11, 3.2 * len(setups)), squeeze=False)
    for i, (ds, kind) in enumerate(setups):
        sel = [r for r in rows if r["dataset"] == ds and r["model"] == kind]
        dense = next(r["test_acc_%"] for r in sel if r["method"] == "dense")
        for j, pattern in enumerate(("unstructured", "channel")):
            ax = axes[i][j]
            ax.axhline(dense, color="k", ls="--", lw=1, label="dense")
            for m, c in colors.items():
                pts = sorted((r["actual_sparsity_%"], r["test_acc_%"]) for r in sel
                             if r["method"] == m and r["pattern"] == pattern)
                if m == "sap":
                    pts = [(r["sparsity_%"], r["test_acc_%"]) for r in sap_rows
                           if r["dataset"] == ds and r["model"] == kind and r["pattern"] == pattern]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, color=c, label=m)
                if pattern == "unstructured":
                    nm = [(r["actual_sparsity_%"], r["test_acc_%"]) for r in sel if r["method"] == m and r["pattern"] == "2:4"]
                    if nm:
                        ax.plot(*zip(*nm), marker="*", ms=11, ls="none", color=c)
            ax.set_title(f"{ds} {kind}: {pattern}" + (" (stars: 2:4)" if pattern == "unstructured" else ""))
            ax.set_xlabel("sparsity (%)" if pattern == "unstructured" else "channels removed (%)")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
        for ax in axes[i]:
            ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(RESULTS / f"accuracy_vs_sparsity{suffix}_{tag}.png", dpi=90)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(setups), figsize=(3.6 * len(setups), 3.2), squeeze=False)
    for i, (ds, kind) in enumerate(setups):
        ax = axes[0][i]
        sel = [r for r in sap_rows if r["dataset"] == ds and r["model"] == kind and r["pattern"] == "unstructured"]
        ax.plot([r["round"] for r in sel], [r["pqi"] for r in sel], marker="o", ms=3, color="tab:green")
        ax.set_xlabel("SAP round")
        ax.set_ylabel("PQ Index (p=0.5, q=1)", color="tab:green")
        ax2 = ax.twinx()
        ax2.plot([r["round"] for r in sel], [r["sparsity_%"] for r in sel], ls="--", color="tab:gray")
        ax2.plot([r["round"] for r in sel], [r["test_acc_%"] for r in sel], ls=":", color="k")
        ax2.set_ylabel("sparsity % (dashed), test acc % (dotted)", fontsize=7)
        ax.set_title(f"{ds} {kind}")
    fig.tight_layout()
    fig.savefig(RESULTS / f"accuracy_sap_pqi{suffix}_{tag}.png", dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
