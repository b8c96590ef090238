"""Hard wall-clock limits for sympy: a small pool of persistent worker subprocesses.

Why a subprocess: sympy can spend minutes inside one call, and Python cannot interrupt another
thread. `signal.alarm` only works on the main thread of the main interpreter, so it fails in
thread pools, async servers and many RL frameworks. A child process can always be killed.

Contract
- `call(op, a, b, deadline)` returns True/False when sympy decided before `deadline`
  (a `time.monotonic()` value), or None when it did not (late, crashed, or undecided).
- On a late answer the worker is killed (SIGKILL) and forgotten; the next call starts a fresh
  one. Starting a worker (importing sympy, about 0.5 s) is not charged to the caller's budget:
  the deadline is moved by the start-up time, and start-up itself is bounded by STARTUP_S.
- Safe from any thread: up to `POOL_SIZE` workers serve concurrent callers; a caller that waits
  for a free worker past its deadline gets None. Safe across fork: a forked child forgets the
  parent's workers (and closes its copies of their pipes) and starts its own when needed.
- Workers read their requests from a pipe and exit when the parent goes away.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, TypeAlias

# An AST of `rewards.normalize` as JSON: nested lists of strings and integers (see `rewards._worker`).
JsonAst: TypeAlias = "list[str | int | JsonAst]"

STARTUP_S = 20.0  # importing sympy on a loaded machine; beyond this the worker is broken
POOL_SIZE = max(1, min(4, os.cpu_count() or 1))
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


class _Worker:
    """One `python -m rewards._worker` process and its pipes."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rewards._worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a Ctrl-C meant for the parent does not kill it mid-call
        )
        # Popen sets both pipes because both were requested with PIPE above.
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: IO[bytes] = self.proc.stdin
        self.stdout: IO[bytes] = self.proc.stdout
        self.buf = b""
        self.ready = False

    def readline(self, deadline: float) -> bytes | None:
        """The next line from the worker, or None if it is not there by `deadline`."""
        fd = self.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None  # the worker died
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def start(self) -> float:
        """Wait until sympy is imported; return the seconds it took. Raise OSError if it fails."""
        t0 = time.monotonic()
        if not self.ready:
            if self.readline(t0 + STARTUP_S) != b'{"ready": true}':
                raise OSError("sympy worker did not start")
            self.ready = True
        return time.monotonic() - t0

    def request(self, message: bytes, deadline: float) -> bool | None:
        self.stdin.write(message)
        self.stdin.flush()
        line = self.readline(deadline)
        if line is None:
            raise TimeoutError
        result = json.loads(line)["result"]
        return None if result is None else bool(result)

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def forget(self) -> None:
        """In a forked child: drop our copies of the pipes without touching the process."""
        for f in (self.stdin, self.stdout):
            try:
                os.close(f.fileno())
            except (OSError, ValueError):
                pass
        self.proc.returncode = 0  # so Popen.__del__ does not try to reap the parent's child


class _Pool:
    """Idle workers plus a count of busy ones, guarded by one condition variable."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.cond = threading.Condition()
        self.idle: list[_Worker] = []
        self.busy = 0

    def acquire(self, deadline: float) -> _Worker | None:
        with self.cond:
            while not self.idle and self.busy >= self.size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.cond.wait(remaining)
            self.busy += 1
            if self.idle:
                return self.idle.pop()
        try:
            return _Worker()
        except OSError:
            self.release(None)
            return None

    def release(self, worker: _Worker | None) -> None:
        with self.cond:
            self.busy -= 1
            if worker is not None:
                self.idle.append(worker)
            self.cond.notify()

    def call(self, op: str, a: JsonAst, b: JsonAst, deadline: float) -> bool | None:
        worker = self.acquire(deadline)
        if worker is None:
            return None
        try:
            deadline += worker.start()
            result = worker.request(json.dumps({"op": op, "a": a, "b": b}).encode() + b"\n", deadline)
        except (OSError, TimeoutError, ValueError, KeyError):
            worker.kill()
            self.release(None)
            return None
        self.release(worker)
        return result

    def close(self) -> None:
        with self.cond:
            workers, self.idle = self.idle, []
        for worker in workers:
            worker.kill()


_pool = _Pool(POOL_SIZE)
_count_lock = threading.Lock()
calls = 0  # sympy requests made by this process (for benchmarks and curiosity)
undecided = 0  # of which returned None: late, crashed, or no verdict


def call(op: str, a: JsonAst, b: JsonAst, deadline: float) -> bool | None:
    """Run sympy operation `op` on two JSON ASTs; None if undecided by `deadline`."""
    global calls, undecided
    result = _pool.call(op, a, b, deadline) if deadline > time.monotonic() else None
    with _count_lock:
        calls += 1
        undecided += result is None
    return result


def _after_fork_in_child() -> None:
    global _pool
    for worker in _pool.idle:
        worker.forget()
    _pool = _Pool(POOL_SIZE)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(lambda: _pool.close())
