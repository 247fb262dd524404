"""``sparsecore bench`` (a pruned file vs its dense self), the demo as a subcommand, and the latency statistics."""
import re
import csv
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsecore as sc
from sparsecore import demo
from sparsecore.compare import compare_latency, quartiles
from cli_helpers import no_interpreter_in_plans, run_cli as _run  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).resolve().parent.parent




def test_bench_writes_to_the_cwd_or_out(tmp_path, capsys, monkeypatch):
    model = tmp_path / "mlp.safetensors"
    rc, _, err = _run(capsys, "prune", "--model", "mlp", "--hidden", "32", "--random-init", "--pattern", "unstructured",
                      "--sparsity", "0.9", "--out", model)
    assert rc == 0, err
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rc, text, err = _run(capsys, "bench", model, "--batch", "2", "--rep", "3")
    assert rc == 0, err
    assert [p.name for p in work.iterdir()] == ["mlp.bench.csv"]
    (row,) = list(csv.DictReader(open(work / "mlp.bench.csv")))
    assert row["model"] == "builtin:mlp" and row["batch"] == "2" and row["pairs"] == "3"
    dense, sparse = float(row["dense_ms"]), float(row["sparse_ms"])
    assert float(row["speedup"]) == pytest.approx(dense / sparse)
    assert float(row["dense_q1_ms"]) <= dense <= float(row["dense_q3_ms"])
    assert float(row["speedup_q1"]) <= float(row["speedup_q3"])
    assert f"{float(row['speedup']):.2f}x" in text
    out = tmp_path / "elsewhere.csv"
    rc, _, err = _run(capsys, "bench", model, "--rep", "2", "--out", out)
    assert rc == 0 and out.is_file() and [p.name for p in work.iterdir()] == ["mlp.bench.csv"], err


def test_demo_subcommand_runs_a_case_end_to_end(capsys, monkeypatch):
    def one_tiny_case(device, small):
        assert small
        x = torch.randn(2, 16, device=device)
        return [("tiny mlp 2:4", lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), x,
                 sc.SparsityConfig("nm"), None)]

    monkeypatch.setattr(demo, "_cases", one_tiny_case)
    rc, out, err = _run(capsys, "demo", "--small", "--rep", "3", "--device", "cpu")
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("tiny mlp 2:4"))
    assert "FAILED" not in line and "all outputs verified" in out
    assert "(IQR)" in out and re.search(r"\d+\.\d\dx +\d+\.\d\d-\d+\.\d\dx ", line), line  # speedup, then its quartiles


def test_python_m_entry_points_and_no_bench_import(tmp_path):
    code = ("import sys, sparsecore.cli as c; before = list(sys.path); "
            "rc = c.main(['prune', '--model', 'mlp', '--hidden', '16', '--random-init', '--pattern', 'nm', "
            f"'--out', {str(tmp_path / 'm.safetensors')!r}]); "
            "assert rc == 0 and sys.path == before, (rc, sys.path); "
            "assert not [m for m in sys.modules if m == 'bench' or m.startswith('bench.')]")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    for module in ("sparsecore.cli", "sparsecore.demo"):
        done = subprocess.run([sys.executable, "-m", module, "--rep", "0"] if module.endswith("demo")
                              else [sys.executable, "-m", module, "demo", "--rep", "0"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
        assert done.stderr.startswith("sparsecore: error: argument --rep"), done.stderr


def test_quartiles_match_the_definition(seeded):
    for n in (1, 2, 5, 8):
        xs = torch.rand(n, generator=seeded, dtype=torch.float64).tolist()
        q1, q2, q3 = quartiles(xs)
        assert q2 == pytest.approx(statistics.median(xs))
        ref = torch.quantile(torch.tensor(xs, dtype=torch.float64), torch.tensor([0.25, 0.75], dtype=torch.float64))
        assert (q1, q3) == pytest.approx(tuple(ref.tolist()))


def test_compare_latency_pairs_and_alternates(monkeypatch):
    order = []

    class Tagged(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def forward(self, x):
            order.append(self.tag)
            return x

    r = compare_latency(Tagged("d"), Tagged("s"), (torch.zeros(1),), warmup=1, rep=4)
    assert order == ["d", "s"] + ["d", "s", "s", "d", "d", "s", "s", "d"]
    assert r.pairs == 4 and r.ratio == pytest.approx(r.dense_ms / r.sparse_ms)
    assert r.dense_q1_ms <= r.dense_ms <= r.dense_q3_ms and r.ratio_q1 <= r.ratio_q3
    with pytest.raises(ValueError, match="rep >= 1"):
        compare_latency(Tagged("d"), Tagged("s"), (torch.zeros(1),), rep=0)
