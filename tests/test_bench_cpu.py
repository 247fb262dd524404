"""bench.bench_cpu's harness logic at tiny shapes: statistics, row fields and ratios, skip rows, provider
discovery from the registry, and the torch-CSR backend against float64. No wall-clock assertions."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from bench import bench_cpu, cpu_providers  # noqa: E402
from bench.cpu_stats import Timing, time_repeated  # noqa: E402
from sparsecore.backends import Backend, implementations  # noqa: E402


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch):
    # Triton backends would otherwise run in the interpreter and be offered as CPU providers.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def fake_timer(table: dict[str, list[float]]):
    """A timer that returns scripted medians: repeat r gives ``table[name][r]``; records who was timed."""
    calls: list[list[str]] = []

    def timer(fns, device, warmup, rep):
        r = len(calls)
        calls.append(sorted(fns))
        return {name: table[name][r] for name in fns}
    return timer, calls


def test_time_repeated_summarises_repeat_medians_and_caps_slow_providers():
    timer, calls = fake_timer({"dense": [10.0, 12.0, 11.0], "fast": [5.0, 4.0, 6.0], "slow": [50.0, 1.0, 1.0]})
    t = time_repeated({"dense": None, "fast": None, "slow": None}, repeats=3, reps=7, cap=4.0, timer=timer)
    assert calls == [["dense", "fast", "slow"], ["dense", "fast"], ["dense", "fast"]]
    assert t["dense"].medians_ms == (10.0, 12.0, 11.0) and t["dense"].median_ms == 11.0
    assert (t["fast"].min_ms, t["fast"].max_ms, t["fast"].reps) == (4.0, 6.0, 7)
    assert t["fast"].spread_pct == pytest.approx(100 * 2.0 / 5.0)
    assert t["slow"].medians_ms == (50.0,) and "5.0x slower than dense" in t["slow"].note
    assert t["slow"].spread_pct == 0.0


def test_time_repeated_without_cap_keeps_everyone_and_checks_arguments():
    timer, calls = fake_timer({"a": [1.0, 2.0], "b": [100.0, 90.0]})
    t = time_repeated({"a": None, "b": None}, repeats=2, reps=1, cap=None, timer=timer)
    assert len(calls) == 2 and t["b"].medians_ms == (100.0, 90.0) and t["b"].note == ""
    with pytest.raises(ValueError, match="baseline"):
        time_repeated({"a": None}, cap=2.0, timer=timer)
    with pytest.raises(ValueError, match=">= 1"):
        time_repeated({"dense": None}, repeats=0, timer=timer)


def _provider(name, group, nbytes):
    return cpu_providers.Provider(name, group, lambda: None, nbytes)


def test_case_rows_ratios_ceilings_and_skip_rows():
    case = bench_cpu.Case(8, 16, 1, "90", torch.float32)
    provs = [_provider("dense", "dense", 1000), _provider("torch_csr", "peer", 400),
             _provider("scipy_csr", "peer", 250), _provider("sc_x", "sparsecore", 200)]
    timings = {"dense": Timing((10.0, 9.0, 11.0), 20), "torch_csr": Timing((8.0,), 20, "1 repeat"),
               "scipy_csr": Timing((5.0, 5.0, 6.0), 20), "sc_x": Timing((2.0, 2.5, 1.5), 20)}
    env = {"device": "CPU", "commit": "abc"}
    rows = bench_cpu.case_rows(case, provs, timings, {"sc_x": 1e-6}, {"sparse_dot_mkl": "not installed"}, env)
    by = {r["provider"]: r for r in rows}
    sc_row = by["sc_x"]
    assert sc_row["speedup_vs_best_dense"] == pytest.approx(10.0 / 2.0)
    assert sc_row["best_peer"] == "scipy_csr" and sc_row["speedup_vs_best_peer"] == pytest.approx(5.0 / 2.0)
    assert sc_row["byte_ceiling"] == pytest.approx(1000 / 200)
    assert sc_row["pct_of_ceiling"] == pytest.approx(100 * 5.0 / 5.0)
    assert (sc_row["time_min_ms"], sc_row["time_max_ms"], sc_row["repeats"]) == (1.5, 2.5, 3)
    assert sc_row["N"] == 8 and sc_row["sparsity_pct"] == 90 and sc_row["dtype"] == "float32"
    assert sc_row["max_abs_err"] == 1e-6 and sc_row["commit"] == "abc"
    assert by["torch_csr"]["note"] == "1 repeat" and by["dense"]["byte_ceiling"] == 1.0
    skip = by["sparse_dot_mkl"]
    assert skip["group"] == "skipped" and skip["note"] == "skipped: not installed" and "time_ms" not in skip


def test_case_pattern_and_sparsity_of_nm():
    case = bench_cpu.Case(8, 16, 1, "2:4", torch.bfloat16)
    assert case.pattern == "nm" and case.sparsity_pct == 50
    assert case.columns()["pattern"] == "2:4" and case.columns()["dtype"] == "bfloat16"


def test_missing_sparse_dot_mkl_is_a_skip_line(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_mkl(name, *a, **k):
        if name == "sparse_dot_mkl":
            raise ImportError("No module named 'sparse_dot_mkl'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_mkl)
    w, x = torch.randn(8, 16), torch.randn(2, 16)
    ready, skipped = cpu_providers.scipy_peers(w, x)
    assert [p.name for p in ready] == ["scipy_csr"]
    assert "sparse_dot_mkl" in skipped and "pip install sparse-dot-mkl" in skipped["sparse_dot_mkl"]


@pytest.mark.parametrize("sparsity", ["70", "2:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_providers_come_from_the_registry_and_agree_with_float64(sparsity, dtype, seeded):
    case = bench_cpu.Case(24, 40, 3, sparsity, dtype)
    w, packed = bench_cpu.make_weight(case, seed=int(torch.randint(0, 1000, (1,), generator=seeded)))
    x = torch.randn(3, 40, generator=seeded).to(dtype)
    ready, skipped = cpu_providers.all_providers(w, packed, x, plan_rep=2)
    names = [p.name for p in ready] + list(skipped)
    for impl in implementations("linear", packed.kind):  # every linear backend of the format is timed or
        # skipped with a reason, except the reference
        assert (f"sc_{impl.name}" in names) == (impl.name != Backend.REFERENCE.value), impl.name
    assert ready[0].name == "dense" and "sc_auto" in names
    ref = x.double() @ w.double().t()
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype] * 40 ** 0.5
    for p in ready:
        y = p.fn()
        assert y.shape == (3, 24) and y.dtype == dtype, p.name
        assert float((y.double() - ref).abs().max()) <= tol * max(1.0, float(ref.abs().max())), p.name
    rows = bench_cpu.case_rows(case, ready, {p.name: Timing((1.0,), 1) for p in ready}, {}, skipped, {})
    assert len(rows) == len(ready) + len(skipped)
    assert all(r["weight_bytes"] > 0 for r in rows if r["group"] != "skipped")


@pytest.mark.parametrize("m", [1, 5])
def test_torch_csr_backend_matches_float64_with_bias(m, seeded):
    import sparsecore as sc
    w = torch.randn(33, 47, generator=seeded)
    packed = sc.pack(w, torch.rand(33, 47, generator=seeded) > 0.6, "unstructured")
    bias = torch.randn(33, generator=seeded)
    lin = sc.SparseLinear(packed, bias, backend="torch_csr")
    x = torch.randn(m, 47, generator=seeded)
    with torch.no_grad():
        y = lin(x)
    ref = x.double() @ packed.to_dense().double().t() + bias.double()
    assert y.is_contiguous() and y.shape == (m, 33)
    torch.testing.assert_close(y.double(), ref, atol=1e-5 * 47 ** 0.5, rtol=1e-5)
    y2 = lin(x)  # the bias is added in place to a fresh tensor: a second call must not accumulate
    torch.testing.assert_close(y2.double(), ref, atol=1e-5 * 47 ** 0.5, rtol=1e-5)


def test_preset_sizes_and_cli_validation(capsys):
    assert len(bench_cpu.preset_cases("full")) == 3 * 5 * 3 * 2
    default = bench_cpu.preset_cases("default")
    assert {(c.n, c.k) for c in default if c.m == 1 and c.dtype == torch.float32} == set(bench_cpu.SHAPES)
    with pytest.raises(SystemExit):
        bench_cpu.main(["--sparsities", "150", "--sections", "kernels"])
    assert "--sparsities takes percents" in capsys.readouterr().err
