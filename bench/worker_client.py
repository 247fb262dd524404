"""The bench's side of a self-timing worker (``bench/deepsparse_runner.py``'s protocol).

A runtime that cannot live in the bench's process (DeepSparse needs its own venv) runs in a worker that
loads the model once, then answers ``run NAME [N]`` with the wall time of each of N (default 1) back-to-back
calls, measured in the worker.
``Worker.provider(NAME)`` makes that a ``bench.cpu_stats.SelfTimed`` provider, timed in the same rounds as
the torch providers. Every read has a deadline: a worker that dies, stalls or answers garbage raises
``ProviderFailed`` (and is killed), it never hangs the bench. POSIX only (``select`` on a pipe).
"""
from __future__ import annotations

import json
import math
import os
import select
import subprocess
import tempfile
import time
from typing import Mapping, Sequence

from .cpu_stats import ProviderFailed, SelfTimed


class Worker:
    """One worker process, started by ``cmd``; ready once it has printed its ready line.

    ``ready``: the runtimes it serves; ``errors``: ``{runtime: why}`` for those that failed to load;
    ``versions``: ``{runtime: version}``. Use as a context manager (``close`` asks it to quit, then kills).
    """

    def __init__(self, cmd: Sequence[str], *, ready_timeout_s: float = 900.0, answer_timeout_s: float = 120.0,
                 env: Mapping[str, str] | None = None) -> None:
        self.answer_timeout_s = answer_timeout_s
        self.error = ""  # set once the worker is unusable: every later sample fails with it
        self._buf = b""
        self._log = tempfile.TemporaryFile()  # its stderr: a pipe nobody drains could fill and block it
        try:
            self._proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                          env=None if env is None else dict(env))
        except OSError as e:  # no such interpreter, not executable
            self._log.close()
            raise ProviderFailed(f"worker could not start: {type(e).__name__}: {e}") from e
        try:
            line = self._read_line(ready_timeout_s, "its ready line")
            try:
                hello = json.loads(line)
                self.ready = [str(n) for n in hello["ready"]]
                self.errors = {str(k): str(v) for k, v in hello["errors"].items()}
                self.versions = {str(k): str(v) for k, v in hello["versions"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                self._fail(f"gave a ready line that is not the protocol's JSON ({type(e).__name__}: {e}): "
                           f"{line[:120]!r}")
        except ProviderFailed:
            self.close()
            raise

    def provider(self, name: str) -> SelfTimed:
        """``name`` as a self-timed provider: each sample is one call's time as the worker measured it."""
        if name not in self.ready:
            raise ValueError(f"the worker serves {self.ready}, not {name!r}")
        return SelfTimed(lambda: self.sample(name), lambda n: self.samples(name, n))

    def sample(self, name: str) -> float:
        """Runs ``name`` once in the worker: the call's wall time in ms, measured there."""
        return self.samples(name, 1)[0]

    def samples(self, name: str, n: int) -> list[float]:
        """Runs ``name`` ``n`` times back to back in the worker: each call's wall time in ms, measured there."""
        if self.error:
            raise ProviderFailed(self.error)
        request = f"run {name}" if n == 1 else f"run {name} {n}"
        try:
            self._proc.stdin.write(f"{request}\n".encode())
            self._proc.stdin.flush()
        except OSError as e:  # a dead worker's stdin: BrokenPipeError
            self._fail(f"could not send {request!r} ({type(e).__name__})")
        line = self._read_line(self.answer_timeout_s * n, f"its answer to {request!r}")
        if line.startswith("error "):
            raise ProviderFailed(f"{name}: {line[len('error '):]}")  # that runtime's call failed; the worker lives
        try:
            times = [float(v) for v in line.split()]
        except ValueError:
            times = []
        if len(times) != n or not all(math.isfinite(ms) and ms >= 0 for ms in times):
            self._fail(f"answered {line[:120]!r} to {request!r}, not {'a time' if n == 1 else f'{n} times'} in ms")
        return times

    def close(self) -> None:
        """Asks the worker to quit; kills it if it has not within 10 s."""
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(b"quit\n")
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self.error = self.error or "worker closed"
        self._log.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_line(self, timeout_s: float, what: str) -> str:
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._fail(f"no {what} within {timeout_s:g} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                self._proc.wait()
                self._fail(f"exited (code {self._proc.returncode}) before {what}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace").strip()

    def _fail(self, why: str) -> None:
        """Kills the worker and raises ``ProviderFailed`` with ``why`` and the tail of its stderr."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        tail = ""
        if not self._log.closed:
            self._log.seek(max(0, self._log.seek(0, os.SEEK_END) - 300))
            tail = self._log.read().decode(errors="replace").strip().replace("\n", " | ")
        self.error = f"worker {why}" + (f"; its stderr ends: {tail}" if tail else "")
        raise ProviderFailed(self.error)
