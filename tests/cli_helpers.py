"""Shared by the CLI test files: run the command in-process, and keep its plans off the Triton interpreter."""
import pytest

from sparsecore import cli


@pytest.fixture(autouse=True)
def no_interpreter_in_plans(monkeypatch):
    # Planning here would otherwise time Triton kernels under the (slow) interpreter.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def run_cli(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``sparsecore *argv``."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def table_rows(text: str) -> dict[str, dict[str, str]]:
    """The per-layer table that ``prune`` / ``inspect`` print, parsed by the header's column offsets:
    ``{layer: {column: cell}}`` (cells stripped). The table ends at the report's summary line."""
    import re

    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("layer "))
    header = lines[start]
    names = re.split(r"\s{2,}", header.strip())
    offsets = [header.index(n) for n in names] + [None]
    rows = {}
    for ln in lines[start + 1:]:
        if re.match(r"\d+ sparse, ", ln):
            break
        cells = {n: ln[offsets[i]:offsets[i + 1]].strip() for i, n in enumerate(names)}
        rows[cells["layer"]] = cells
    return rows
