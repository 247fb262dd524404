"""bench.bench_models on tiny dims: one row per model x batch x variant, honest speedups and error checks."""
import csv
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsecore as sc

# bench/ is a top-level folder, not part of the installed package (until pytest's pythonpath names the root)
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from bench import bench_models as bm  # noqa: E402


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch):
    # The planner would time Triton kernels under the interpreter (minutes); the CPU bench skips them too.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_quick_path_writes_a_complete_table(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert bm.main(["--quick", "--preset", "tiny", "--rep", "2", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # restored for the rest of the process
    (table,) = tmp_path.glob("models_tiny_*.csv")
    assert (tmp_path / (table.stem + ".md")).is_file()
    rows = list(csv.DictReader(table.open()))
    specs = bm.specs("tiny")
    expected = {(s.name, b, v) for s in specs for b in s.batches for v in bm.VARIANTS}
    assert {(r["model"], int(r["batch"]), r["provider"]) for r in rows} == expected and len(rows) == len(expected)
    for r in rows:
        assert r["device"].startswith("CPU") and r["torch"] == torch.__version__ and r["commit"] and r["date"]
        ms, dense_ms = float(r["time_ms"]), float(r["best_dense_time_ms"])
        assert ms > 0 and float(r["speedup_vs_best_dense"]) == pytest.approx(dense_ms / ms)
        assert int(r["sparsity_pct"]) == {"dense": 0, "2:4": 50, "unstructured90": 90, "channel50": 50}[r["provider"]]
        assert r["agrees"] == "True", r
        assert float(r["max_abs_err"]) <= 1e-4 * max(1.0, float(r["ref_max_abs"]))
        assert r["peak_MB"] == ""  # only measured on CUDA
        names = {b.value for b in sc.Backend}
        if r["provider"] == "dense":
            assert float(r["speedup_vs_best_dense"]) == 1.0 and r["backends"] == "-"
        else:
            counts = dict(item.split(":") for item in r["backends"].split())
            assert set(counts) <= names and sum(map(int, counts.values())) > 0
    # the slimmed ResNet is physically smaller than its dense self
    mb = {r["provider"]: float(r["model_MB"]) for r in rows if r["model"] == "resnet50"}
    assert mb["channel50"] < 0.75 * mb["dense"]
    assert "slim" in next(r["how"] for r in rows if r["model"] == "resnet50" and r["provider"] == "channel50")


def test_disagreeing_model_is_flagged(monkeypatch):
    real = bm._sparse_variant

    def broken(spec, dense, config, x0):
        model, ref, how = real(spec, dense, config, x0)
        with torch.no_grad():
            ref.get_submodule("gate_proj").weight.mul_(1.01)  # the reference now differs by ~1%
        return model, ref, how

    monkeypatch.setattr(bm, "_sparse_variant", broken)
    spec = bm.specs("tiny")[0]
    spec.batches = (1,)
    rows = bm.bench_model(spec, ["dense", "unstructured90"], torch.device("cpu"), torch.float32, rep=1,
                          log=lambda s: None)
    by = {r["provider"]: r for r in rows}
    assert by["dense"]["agrees"] is True and by["unstructured90"]["agrees"] is False


def test_model_bytes_counts_params_buffers_and_backend_state():
    lin = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8))
    dense_bytes = (16 * 8 + 8 + 8 + 8 + 8 + 8) * 4 + 8  # weights, bias, BN affine + running stats, int64 counter
    assert bm.model_bytes(lin) == dense_bytes
    sparse = sc.sparsify(nn.Sequential(nn.Linear(16, 8)), sc.SparsityConfig("unstructured", 0.5))
    packed = sum(b.untyped_storage().nbytes() for b in sparse.buffers()) + 8 * 4
    assert bm.model_bytes(sparse) == packed
    sparse(torch.randn(2, 16))  # unplanned AUTO runs dense: the layer now holds the dense weight instead
    assert bm.model_bytes(sparse) == 16 * 8 * 4 + 8 * 4


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        bm.main(["--models", "gpt5"])
    assert e.value.code == 2 and "unknown model or variant 'gpt5'" in capsys.readouterr().err


def test_plots_from_tables(tmp_path, capsys):
    from bench import plots
    from bench.common import write_table

    rows = [{"provider": p, "M": m, "sparsity_pct": s, "shape": "96x64", "time_ms": 1.0 + m * (1 - s / 100) + (p == "dense"),
             "device": "CPU test"} for p in ("dense", "triton") for m in (1, 4, 16) for s in (50, 90)]
    write_table("spmm", rows, "cpu", tmp_path)
    (tmp_path / "junk_cpu.csv").write_text("a,b\n1,2\n")
    # a model table: each provider sits at one sparsity, so only the batch figure has lines to draw
    model_rows = [{"provider": p, "model": m, "batch": b, "sparsity_pct": s, "time_ms": 1.0 + b}
                  for m in ("a", "b") for p, s in (("dense", 0), ("2:4", 50)) for b in (1, 4)]
    write_table("models", model_rows, "cpu", tmp_path)
    assert plots.panel_facets(model_rows, "batch") == ["model"]  # dense and 2:4 share a panel
    assert plots.panel_facets(rows, "M") == ["sparsity_pct"]
    assert plots.main(["--results", str(tmp_path), "--out", str(tmp_path / "fig")]) == 0
    out = capsys.readouterr().out
    made = sorted(p.name for p in (tmp_path / "fig").glob("*.png"))
    stem, models = next(tmp_path.glob("spmm_*.csv")).stem, next(tmp_path.glob("models_*.csv")).stem
    assert made == sorted([f"{stem}_vs_batch.png", f"{stem}_vs_sparsity.png", f"{models}_vs_batch.png"])
    assert all((tmp_path / "fig" / m).stat().st_size > 1000 for m in made)
    assert "skip nm: no nm_*.csv" in out and "skip junk_cpu.csv: no time_ms or provider column" in out


def test_eager_rows_timed_without_autograd_and_a_failing_variant_is_a_row(tmp_path, monkeypatch):
    real_build, real_time = bm._sparse_variant, bm.time_interleaved_ms
    grad_on_while_timing = []

    def build(spec, dense, config, x0):
        if config.pattern == "unstructured":
            raise RuntimeError("planted failure")
        return real_build(spec, dense, config, x0)

    def timed(fns, device, **kw):
        grad_on_while_timing.append(torch.is_grad_enabled())
        return real_time(fns, device, **kw)

    monkeypatch.setattr(bm, "_sparse_variant", build)
    monkeypatch.setattr(bm, "time_interleaved_ms", timed)
    code = bm.main(["--preset", "tiny", "--models", "decoder_block", "--variants", "dense,2:4,unstructured90",
                    "--batches", "3", "--rep", "2", "--out-dir", str(tmp_path)])
    assert code == 1
    assert grad_on_while_timing == [False]  # as the planner measures: no autograd bookkeeping
    rows = list(csv.DictReader(next(tmp_path.glob("models_tiny_*.csv")).open()))
    assert [(r["provider"], r["batch"]) for r in rows] == [("dense", "3"), ("2:4", "3"), ("unstructured90", "3")]
    bad = rows[2]
    assert bad["error"] == "RuntimeError: planted failure" and bad["time_ms"] == "" and bad["sparsity_pct"] == "90"
    assert all(r["error"] == "" and float(r["time_ms"]) > 0 for r in rows[:2])
