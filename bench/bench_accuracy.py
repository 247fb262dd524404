"""Accuracy vs sparsity of every pruning method on offline data (scikit-learn digits, mnist1d), CPU.

    python -m bench.bench_accuracy [--quick]

For each dataset x model (MLP, small CNN): train dense, then start every method from that same dense model
with the same fine-tuning budget (epochs): one-shot magnitude + fine-tune (reference), GMP, PDP, SAP (PQ
Index rounds, one epoch of fine-tuning per round; its sparsity is whatever the rounds reach), SNACS
(single shot + fine-tune), PSAP (channel only). Patterns: unstructured 50-95%, 2:4, channel 25-75% of the
hidden layers' output channels (the classifier is never channel-pruned). The dense row gets the same extra
epochs. Writes ``bench/results/accuracy_<device>.{csv,md}``, ``accuracy_sap_rounds_<device>.{csv,md}`` and
two PNG plots. Everything is generated locally; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from bench.common import RESULTS, env_info, slug, device_name, write_table
from sparsecore.masks import as_matrix
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and sparsities (~2 minutes)")
    args = ap.parse_args(argv)
    budget = QUICK if args.quick else FULL
    # Tiny models: one thread is ~5x faster than two on a shared 2-core machine (no sync overhead).
    torch.set_num_threads(1)
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
