"""bench.bench_accuracy --large-sparse on tiny settings: non-zero matching, GMP reaching it, tables and plot."""
import csv
import sys
from pathlib import Path

import pytest
import torch

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from bench import bench_accuracy as ba  # noqa: E402


def test_matching_sparsity_keeps_the_target_count():
    counts = ba.linear_weight_counts(ba.mlp_for(40, 96))  # 40*96, 96*96, 96*10
    for width in (3, 8, 17, 50):
        target = sum(ba.linear_weight_counts(ba.mlp_for(40, width)))
        s = ba.matching_sparsity(counts, target)
        kept = sum(ba.keep_count(n, s) for n in counts)  # GMP's per-layer rule
        assert abs(kept - target) <= 0.02 * target and abs(kept - target) <= len(counts)
    with pytest.raises(ValueError, match="target non-zero count"):
        ba.matching_sparsity(counts, sum(counts) + 1)
    with pytest.raises(ValueError, match="more than 2% away"):
        ba.matching_sparsity([3, 3], 1)  # each layer rounds its own count: 1 of 6 is unreachable within 2%


def test_tiny_experiment_writes_matched_tables_and_plot(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        budget = ba.LargeSparseBudget(setups=(ba.LargeSparseSetup("digits", (4, 8), (8, 24)),), epochs=3,
                                      seeds=(0, 1), updates=5)
        summary, runs = ba.run_large_sparse(budget, tmp_path, "_tiny")
    finally:
        torch.set_num_threads(threads)
    # width 8 is small-dense and, pruned to width 4's count, large-sparse; 24 is pruned to both and run dense
    assert [(r["model"], r["width"], r["matched_width"]) for r in summary] == [
        ("small-dense", 4, 4), ("small-dense", 8, 8), ("large-dense", 24, 24), ("large-sparse", 8, 4),
        ("large-sparse", 24, 4), ("large-sparse", 24, 8)]
    assert len(runs) == len(summary) * 2 and {r["seed"] for r in runs} == {0, 1}
    for r in runs:  # measured on the trained weights, not the plan
        target = sum(ba.linear_weight_counts(ba.mlp_for(64, r["matched_width"])))
        assert abs(r["nonzeros"] - target) <= 0.02 * target
        assert (r["sparsity_%"] > 50) == (r["model"] == "large-sparse")
        assert 0 <= r["test_acc_%"] <= 100
    for row in summary:
        accs = [r["test_acc_%"] for r in runs if (r["model"], r["width"], r["matched_width"]) ==
                (row["model"], row["width"], row["matched_width"])]
        assert row["test_acc_mean_%"] == pytest.approx(sum(accs) / 2, abs=0.01)
        assert row["test_acc_std_%"] == pytest.approx(float(torch.tensor(accs, dtype=torch.float64).std()), abs=0.01)
        assert row["test_acc_min_%"] == min(accs) and row["test_acc_max_%"] == max(accs)
        assert (row["delta_vs_small_dense_pts"] != "") == (row["model"] == "large-sparse")
        if row["model"] == "large-sparse":  # paired per seed with the small-dense model of the same count
            ref = [r["test_acc_%"] for r in runs if (r["model"], r["width"]) == ("small-dense", row["matched_width"])]
            diffs = [a - b for a, b in zip(accs, ref)]
            assert float(row["delta_vs_small_dense_pts"].split(" ± ")[0]) == pytest.approx(sum(diffs) / 2, abs=0.02)
            assert row["seeds_ahead"] == f"{sum(d > 0 for d in diffs)}/2"
    (table,) = tmp_path.glob("accuracy_large_sparse_tiny_*.csv")
    assert len(list(csv.DictReader(table.open()))) == len(summary)
    assert table.with_suffix(".md").is_file() and table.with_suffix(".png").stat().st_size > 1000
    assert len(list(tmp_path.glob("accuracy_large_sparse_runs_tiny_*.csv"))) == 1


def test_gmp_that_cannot_finish_is_an_error():
    # 25 updates need >= 25 steps after t0; 1 epoch of digits has 23: the schedule must not be silently cut.
    budget = ba.LargeSparseBudget(setups=(), epochs=1, seeds=(0,), updates=25)
    x, y = torch.randn(64 * 23, 64), torch.randint(0, 10, (64 * 23,))
    with pytest.raises(RuntimeError, match="did not finish"):
        ba.train_large_sparse(8, 0.5, x, y, [(x[:8], y[:8])], 1, 0, budget)


def test_flag_dispatches_to_the_experiment(monkeypatch):
    seen = []
    monkeypatch.setattr(ba, "run_large_sparse", lambda budget, suffix="": seen.append((budget, suffix)))
    threads = torch.get_num_threads()
    try:
        ba.main(["--large-sparse", "--quick"])
    finally:
        torch.set_num_threads(threads)
    assert seen == [(ba.LS_QUICK, "_quick")]
