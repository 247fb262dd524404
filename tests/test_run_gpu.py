"""bench/run_gpu.sh as a dry run on this CPU machine: every headline step runs on tiny shapes, and the same
files come back in OUT as a GPU call returns (results.tar.gz, gpu_run.log, SUMMARY.md).

The headline dry run works on a copy of the sources as the device tool makes one: no ``.git`` and no
``sparsecore/kernels`` link, so it takes the PYTHONPATH fallback (a folder of links) and records a hash of
the sources as the commit."""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = ("nm", "spmm", "models", "channel", "tests")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None,
                                reason="needs bash and tar")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT", "RUN_DIR")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python3 = this python
    return {**env, "RUN_GPU_DRY": "1", **extra}  # a dry run on a GPU machine too


def _run(args: list[str], timeout: int, root: Path = ROOT, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / "bench" / "run_gpu.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(**extra), cwd=root)


def _results_listing(root: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in (root / "bench" / "results").iterdir()}


def _device_copy(dest: Path) -> Path:
    """The sources as the device tool sends them: files only, no .git, no untracked sparsecore/kernels link."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {".git", "__pycache__", ".pytest_cache", ".hypothesis"}
        if Path(folder).resolve() == (ROOT / "sparsecore").resolve():
            skip.add("kernels")
        return skip & set(names)

    for part in ("bench", "kernels", "sparsecore", "tests"):
        shutil.copytree(ROOT / part, dest / part, ignore=ignore, symlinks=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.mark.slow
def test_headline_dry_run_returns_every_file(tmp_path):
    out, run_dir = tmp_path / "out", tmp_path / "run"
    root = _device_copy(tmp_path / "copy")
    before = _results_listing(root)
    res = _run(["headline"], 480, root, OUT=str(out), RUN_DIR=str(run_dir), GIT_CEILING_DIRECTORIES=str(tmp_path))
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "DRY RUN" in log and "on PYTHONPATH through" in log
    commit = re.search(r"commit: (files-[0-9a-f]{12}) \(no git here", log).group(1)

    # What comes back: three files, whole (no temporary .part left), no deeper than OUT itself.
    assert sorted(p.name for p in out.iterdir()) == ["SUMMARY.md", "gpu_run.log", "results.tar.gz"]
    steps = dict(line.split()[:2] for line in (run_dir / "steps.txt").read_text().splitlines())
    assert steps == {name: "ok" for name in HEADLINE}
    with tarfile.open(out / "results.tar.gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        tables = {name: list(csv.DictReader(io.TextIOWrapper(tar.extractfile(m), encoding="utf-8")))
                  for name, m in members.items() if name.endswith(".csv")}
    assert {"SUMMARY.md", "gpu_run.log", "steps.txt", "gpu_tests.xml"} <= set(members)
    prefixes = ("nm_matmul_2x4_float32_", "spmm_", "models_tiny_", "channel_conv_")
    assert sorted(n.split("cpu-")[0] for n in tables) == sorted(prefixes)
    for name, rows in tables.items():
        assert rows and {r["commit"] for r in rows} == {commit}, name
        assert f"{name[:-4]}.md" in members
    # The GPU providers of the headline appear, each saying why it did not run here.
    nm = {r["provider"]: r["error"] for r in tables[next(n for n in tables if n.startswith("nm_"))]}
    assert nm["dense"] == "" and all(nm[p].startswith("not run: ") for p in ("cusparselt", "cutlass", "triton_nm"))
    spmm = {r["provider"] for r in tables[next(n for n in tables if n.startswith("spmm_"))]}
    assert spmm == {"dense", "torch_csr", "sparsecore_triton", "sparsecore_sell"}
    assert {(r["sparsity_pct"], r["M"]) for r in tables[next(n for n in tables if n.startswith("spmm_"))]} == \
        {("50", "1"), ("50", "16"), ("90", "1"), ("90", "16")}

    summary = (out / "SUMMARY.md").read_text()
    for heading in ("## 2:4 linear", "## Unstructured linear", "## Models end to end, eager", "## Channel conv",
                    "## Tests"):
        assert heading in summary, heading
    assert "GPU tests:" in summary and "| tests | ok |" in summary
    assert (out / "gpu_run.log").read_text().rstrip().endswith(summary.rstrip().splitlines()[-1])
    assert _results_listing(root) == before  # a dry run never writes over the committed tables


def test_budget_spent_skips_steps_says_so_and_still_packs(tmp_path):
    out = tmp_path / "out"
    res = _run(["headline", "nm,tests", "0"], 300, OUT=str(out), RUN_DIR=str(tmp_path / "run"))
    assert res.returncode == 1
    assert re.search(r"!! skipped nm: -\d+s of the 0s budget left", res.stdout), res.stdout
    assert "steps not ok: nm tests" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == ["SUMMARY.md", "gpu_run.log", "results.tar.gz"]
    assert "| nm | skipped(time) | 0 |" in (out / "SUMMARY.md").read_text()


@pytest.mark.parametrize("args, message", [(["fast"], "usage"), (["headline", "nm,gemm"], "unknown step 'gemm'"),
                                           (["headline", "nm", "9m"], "BUDGET_S must be a whole number")])
def test_bad_arguments_exit_2(args, message):
    res = _run(args, 60)
    assert res.returncode == 2 and message in res.stderr


def test_summary_spells_the_column_names_as_common_does():
    sys.path.insert(0, str(ROOT)) if str(ROOT) not in sys.path else None
    from bench import common, summary
    assert (summary.PROVIDER, summary.BEST_DENSE_MS, summary.SPEEDUP, summary.ERROR, summary.NOT_RUN) == \
        (common.PROVIDER, common.BEST_DENSE_MS, common.SPEEDUP, common.ERROR, common.NOT_RUN)
    assert summary.ENV_COLUMNS == common.ENV_COLUMNS
