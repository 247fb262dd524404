"""bench.common's shared vocabulary and row helpers, each kernel bench's main on tiny shapes, masked_copy."""
import csv
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

# bench/ is a top-level folder, not part of the installed package
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from bench import bench_channel, bench_nm, bench_spmm  # noqa: E402
from bench import common  # noqa: E402
from sparsecore.pruning.base import masked_copy  # noqa: E402

VOCAB = (common.PROVIDER, common.TIME_MS, common.BEST_DENSE_MS, common.SPEEDUP, common.SPARSITY_PCT)


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch):
    # The benches would otherwise time Triton kernels under the interpreter on CPU (slow, meaningless).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _read(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _check_table(rows: list[dict], dense: tuple[str, ...], case_cols: tuple[str, ...]) -> None:
    """Canonical columns and env columns present; speedup = best dense time of the same case / time.
    Rows of providers that did not run carry the reason in ``error`` and no timing."""
    assert rows
    for r in rows:
        if r.get(common.ERROR):
            assert r[common.TIME_MS] == r[common.SPEEDUP] == "", r
    rows = [r for r in rows if not r.get(common.ERROR)]
    for col in VOCAB + common.ENV_COLUMNS:
        assert col in rows[0], col
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        cases.setdefault(tuple(r[c] for c in case_cols), []).append(r)
    for case in cases.values():
        best = min(float(r[common.TIME_MS]) for r in case if r[common.PROVIDER] in dense)
        for r in case:
            ms = float(r[common.TIME_MS])
            assert ms > 0 and float(r[common.BEST_DENSE_MS]) == pytest.approx(best)
            assert float(r[common.SPEEDUP]) == pytest.approx(best / ms)
            assert r["device"].startswith("CPU") and r["torch"] == torch.__version__ and r["commit"] and r["date"]


def test_best_dense_ms_picks_the_fastest_dense_and_needs_one():
    times = {"dense": 2.0, "dense_compile": 1.5, "sparse": 0.5}
    assert common.best_dense_ms(times, ("dense", "dense_compile")) == 1.5
    assert common.best_dense_ms({"dense": 2.0, "sparse": 0.5}, ("dense", "dense_compile")) == 2.0
    with pytest.raises(ValueError, match="no dense baseline"):
        common.best_dense_ms({"sparse": 0.5}, ("dense",))


def test_kernel_rows_written_with_the_vocabulary(tmp_path):
    env = common.env_info("cpu")
    assert tuple(env) == common.ENV_COLUMNS
    times = {"dense": 4.0, "triton": 1.0}
    best = common.best_dense_ms(times, ("dense",))
    case = {"N": 8, "K": 16, "M": 2, common.SPARSITY_PCT: 50}
    rows = [common.kernel_row(case, p, t, best, moved_bytes=4000, dense_flop=2.0 * 2 * 8 * 16, max_abs_err=0.0,
                              env=env, first_call_ms=3.0) for p, t in times.items()]
    assert rows[1]["GB_per_s"] == pytest.approx(4000 / 1.0 / 1e6)
    assert rows[1]["TFLOP_per_s"] == pytest.approx(512 / 1.0 / 1e9)
    assert list(rows[0])[-len(env):] == list(common.ENV_COLUMNS)  # env columns close every row
    md = common.write_table("unit", rows, "cpu", tmp_path)
    table = _read(md.with_suffix(".csv"))
    _check_table(table, ("dense",), ("N", "K", "M"))
    assert [float(r[common.SPEEDUP]) for r in table] == [1.0, 4.0]
    assert common.SPEEDUP in md.read_text().splitlines()[0]


def test_bench_nm_main_writes_canonical_table(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_nm, "CPU_SHAPES", [(24, 40)])
    monkeypatch.setattr(bench_nm, "CPU_MS", [1, 3])
    assert bench_nm.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    (table,) = tmp_path.glob("nm_matmul_2x4_*.csv")
    rows = _read(table)
    _check_table(rows, bench_nm.DENSE, ("N", "K", "M"))
    assert {r[common.PROVIDER] for r in rows if not r[common.ERROR]} == {"dense", "reference"}
    not_run = {r[common.PROVIDER]: r[common.ERROR] for r in rows if r[common.ERROR]}
    assert set(not_run) == {"dense_compile", "cusparselt", "cutlass", "triton_nm"}  # each says why
    assert all(e.startswith(common.NOT_RUN) for e in not_run.values())
    assert {int(r["M"]) for r in rows} == {1, 3} and {r["sparsity_pct"] for r in rows} == {"50"}
    assert "time_us" not in rows[0]


def test_bench_spmm_main_writes_canonical_table(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_spmm, "CPU_SHAPES", ((24, 40),))
    monkeypatch.setattr(bench_spmm, "copy_bandwidth_gb_s", lambda device: 10.0)  # skip the 16 MiB copy
    assert bench_spmm.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    (table,) = tmp_path.glob("spmm_*.csv")
    rows = _read(table)
    _check_table(rows, bench_spmm.DENSE_PROVIDERS, ("N", "K", "M", "sparsity_pct"))
    assert {"dense", "reference"} <= {r[common.PROVIDER] for r in rows if not r[common.ERROR]}
    for r in rows:
        if r[common.ERROR]:
            assert r[common.ERROR].startswith(common.NOT_RUN) and r[common.PROVIDER] != "dense"
            continue
        assert float(r["pct_of_copy_bw"]) == pytest.approx(100 * float(r["GB_per_s"]) / 10.0)


def test_bench_channel_main_takes_out_dir_and_old_out(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_channel, "SHAPES", [(f"conv{i}", 8, 8, 4, 4, 3, 1) for i in range(5)])
    # Distinct fake timings: the test checks the bookkeeping (which baseline, which ratio), not the clock.
    clock = iter(range(1, 10_000))
    monkeypatch.setattr(bench_channel, "time_ms", lambda fn, device: (fn(), 0.1 * next(clock))[1])
    real, made = bench_channel.bench_model, []

    def small_model(device, dtype, batches, size, width):  # a smaller ResNet-50 than the CPU preset, built once
        if not made:
            made.extend(real(device, dtype, batches, 32, 4))
        return made

    monkeypatch.setattr(bench_channel, "bench_model", small_model)
    assert bench_channel.main(["--quick", "--out-dir", str(tmp_path / "a")]) == 0
    conv, model = (_read(next((tmp_path / "a").glob(f"{n}_*.csv"))) for n in ("channel_conv", "channel_resnet50"))
    _check_table(conv, ("dense",), ("layer", "batch"))  # best dense over both layouts
    _check_table(model, ("dense",), ("model", "batch"))
    assert {r["layout"] for r in conv} == {"channels_last", "nchw"} and {r["sparsity_pct"] for r in conv} == {"75"}
    assert {r[common.PROVIDER] for r in model} == {"dense", "slimmed"}
    for r in conv:  # the second speedup names its baseline
        (same,) = (float(d[common.TIME_MS]) for d in conv
                   if d[common.PROVIDER] == "dense" and (d["layer"], d["layout"]) == (r["layer"], r["layout"]))
        assert float(r["speedup_vs_dense_same_layout"]) == pytest.approx(same / float(r[common.TIME_MS]))
    assert bench_channel.main(["--quick", "--out", str(tmp_path / "b")]) == 0
    assert len(list((tmp_path / "b").glob("channel_conv_*.csv"))) == 1


def test_masked_copy_zeroes_pruned_weights_exactly(seeded):
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        w = model[0].weight
        w.normal_(generator=seeded)
        w[0, 0], w[1, 1], w[2, 2] = float("nan"), -0.0, float("inf")
    original = model[0].weight.detach().clone()
    mask = torch.rand(5, 7, generator=seeded) > 0.5
    mask[0, 0] = mask[1, 1] = mask[2, 2] = False
    mask[3, 3] = True
    ref = masked_copy(model, {"0": mask})
    got = ref[0].weight.detach()
    assert got.dtype == torch.float64 and ref[2].weight.dtype == torch.float64
    want = torch.where(mask, original.double(), torch.zeros((), dtype=torch.float64))
    assert torch.equal(got, want)
    assert not torch.signbit(got[~mask]).any()  # +0, not -0 (nor NaN) where pruned
    assert torch.equal(ref[2].weight.detach(), model[2].weight.detach().double())  # unmasked layer: cast only
    torch.testing.assert_close(model[0].weight.detach(), original, rtol=0, atol=0, equal_nan=True)  # untouched
    assert masked_copy(model, {"0": mask}, dtype=torch.float32)[0].weight.dtype == torch.float32
    with pytest.raises(KeyError, match="no such module"):
        masked_copy(model, {"9": mask})
    with pytest.raises(ValueError, match="does not match weight shape"):
        masked_copy(model, {"0": mask[:, :6]})


def test_table_is_rewritten_after_every_case_and_keeps_what_finished(tmp_path, monkeypatch):
    """A bench cut off mid-run (here: interrupted while timing its second case) leaves the first case's
    rows on disk, in a whole file (no ``.part`` left behind)."""
    monkeypatch.setattr(bench_spmm, "copy_bandwidth_gb_s", lambda device: 10.0)
    calls = iter(range(10_000))
    real = bench_spmm.time_ms

    def time_or_stop(fn, device):
        if next(calls) == 3:  # dense, torch_csr, reference of case 1 timed; stop in case 2
            raise KeyboardInterrupt
        return real(fn, device)

    monkeypatch.setattr(bench_spmm, "time_ms", time_or_stop)
    with pytest.raises(KeyboardInterrupt):
        bench_spmm.main(["--shapes", "24x40", "--ms", "1,2", "--sparsities", "50", "--out-dir", str(tmp_path)])
    (table,) = tmp_path.glob("spmm_*.csv")
    rows = _read(table)
    assert {r["M"] for r in rows} == {"1"}
    assert {r[common.PROVIDER] for r in rows if not r[common.ERROR]} == {"dense", "torch_csr", "reference"}
    assert not list(tmp_path.glob("*.part"))
    assert table.with_suffix(".md").read_text().count("\n") == len(rows) + 2


def test_a_failing_provider_is_a_row_and_the_run_goes_on(tmp_path, monkeypatch):
    import sparsecore.kernels.spmm as spmm_mod

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(spmm_mod, "spmm_ref", broken)
    monkeypatch.setattr(bench_spmm, "copy_bandwidth_gb_s", lambda device: 10.0)
    code = bench_spmm.main(["--shapes", "24x40,16x32", "--ms", "1", "--sparsities", "50,90",
                            "--providers", "dense,torch_csr,reference", "--out-dir", str(tmp_path)])
    assert code == 1  # sparsecore's own provider failed: the exit status says so
    rows = _read(next(tmp_path.glob("spmm_*.csv")))
    cases = {(r["N"], r["sparsity_pct"]) for r in rows}
    assert cases == {("24", "50"), ("24", "90"), ("16", "50"), ("16", "90")}  # every case still ran
    errors = [r for r in rows if r[common.PROVIDER] == "reference"]
    assert len(errors) == 4 and all(r[common.ERROR] == "RuntimeError: planted failure" for r in errors)
    assert all(r[common.TIME_MS] == "" for r in errors)
    _check_table(rows, bench_spmm.DENSE_PROVIDERS, ("N", "K", "M", "sparsity_pct"))
    assert {r[common.PROVIDER] for r in rows} == {"dense", "torch_csr", "reference"}  # only those asked for


def test_bench_options_reject_bad_values(capsys):
    for argv in (["--shapes", "4096"], ["--ms", "0"], ["--sparsities", "100"], ["--providers", "dense,nope"]):
        with pytest.raises(SystemExit) as exc:
            bench_spmm.main(argv)
        assert exc.value.code == 2
    assert "nope" in capsys.readouterr().err
    assert common.shapes_arg("4096x11008,8X16") == [(4096, 11008), (8, 16)]
    assert common.sparsities_arg("50,0.9,95") == [0.5, 0.9, 0.95]


def test_commit_column_override_git_and_no_git(monkeypatch, capsys, tmp_path):
    common.git_commit.cache_clear()
    monkeypatch.setenv("SPARSECORE_COMMIT", "abc1234")
    try:
        assert common.git_commit() == "abc1234"
        common.git_commit.cache_clear()
        monkeypatch.delenv("SPARSECORE_COMMIT")

        def no_git(*args):
            raise FileNotFoundError("git")

        monkeypatch.setattr(common, "_git", no_git)
        got = common.git_commit()
        assert got == common.source_digest() and got.startswith("files-") and len(got) == len("files-") + 12
        err = capsys.readouterr().err
        assert "no git commit here" in err and "SPARSECORE_COMMIT" in err
    finally:
        common.git_commit.cache_clear()
    # the digest names the content: one changed byte changes it
    (tmp_path / "sparsecore").mkdir()
    (tmp_path / "sparsecore" / "a.py").write_text("x = 1\n")
    before = common.source_digest(tmp_path)
    (tmp_path / "sparsecore" / "a.py").write_text("x = 2\n")
    assert common.source_digest(tmp_path) != before


def test_bench_overhead_main_times_every_path(tmp_path):
    """On CPU the launches are stubbed: every sparse path must still resolve and run (host cost only)."""
    from bench import bench_overhead
    assert bench_overhead.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    rows = _read(next(tmp_path.glob("overhead_*.csv")))
    timed = {r[common.PROVIDER] for r in rows if not r.get(common.ERROR)}
    assert {"nn.Linear", "SparseLinear[triton_nm]", "SparseLinear[triton_spmm]", "SparseLinear[triton_sell]",
            "nm_matmul()", "spmm()", "nn.Conv2d", "SparseConv2d[triton_channel]"} <= timed
    assert all(float(r["host_us"]) > 0 for r in rows)
