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
