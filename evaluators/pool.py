"""A small pool of worker processes with a per-task timeout (``concurrent.futures`` cannot kill one
hung task, and ``signal.alarm`` only works on the main thread).

Workers are plain subprocesses, ``python -m aropd.evaluators.pool module:function``, that read one
JSON list of arguments per line on stdin and answer one JSON line on stdout. Being fresh
interpreters (not forks, not ``multiprocessing`` spawns), they are safe to start from a process that
holds threads, CUDA or a distributed backend, and they never re-import the caller's ``__main__``.
A task that runs past ``timeout_s`` gets its worker killed and replaced, and is tried again on a fresh
worker up to ``retries`` times before it is reported as a timeout: on a loaded machine a check that
normally takes a second can miss its limit once, and a correct answer must not be graded wrong for
it. A worker that dies reports its task as failed. Nothing here raises because of a task.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import subprocess
import sys
import time
from collections import deque
from typing import Any, Sequence

_READY = "READY"


def _resolve(target: str):
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)


def _serve(target: str) -> None:  # pragma: no cover - runs in the worker
    func = _resolve(target)
    out = sys.stdout
    out.write(_READY + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            res = {"ok": True, "value": func(*json.loads(line))}
        except BaseException as e:  # noqa: BLE001 - report, keep serving
            res = {"ok": False, "value": f"error: {type(e).__name__}: {e}"[:500]}
        out.write(json.dumps(res) + "\n")
        out.flush()


class _Worker:
    def __init__(self, target: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "aropd.evaluators.pool", target],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready = False
        self.task: int | None = None
        self.t0 = 0.0
        self.born = time.monotonic()

    def lines(self) -> list[str] | None:
        """Complete lines available now; ``None`` at EOF (the worker died)."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None
        self.buf += chunk
        *done, self.buf = self.buf.split(b"\n")
        return [d.decode("utf-8", "replace") for d in done]

    def send(self, i: int, args: tuple) -> None:
        self.task, self.t0 = i, time.monotonic()
        self.proc.stdin.write((json.dumps(list(args)) + "\n").encode())
        self.proc.stdin.flush()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def map_with_timeout(target: str, items: Sequence[tuple], workers: int, timeout_s: float,
                     startup_timeout_s: float = 120.0, retries: int = 1) -> list[tuple[bool, Any]]:
    """``[(ok, value)]`` for ``target(*item)`` (``target`` = ``"module:function"``, arguments and
    results JSON-serialisable), in order; ``(False, reason)`` on a timeout (``"timeout"``, after
    ``1 + retries`` tries), an exception or a dead worker. ``timeout_s`` counts from the moment the
    task reaches a started worker, so interpreter start-up is never part of it. ``workers <= 0``
    runs in this process, without timeout protection."""
    if not items:
        return []
    if workers <= 0:
        func = _resolve(target)
        out = []
        for args in items:
            try:
                out.append((True, func(*args)))
            except Exception as e:  # noqa: BLE001
                out.append((False, f"error: {type(e).__name__}: {e}"))
        return out

    results: list[tuple[bool, Any] | None] = [None] * len(items)
    pending = deque(range(len(items)))
    tries = [0] * len(items)
    pool: list[_Worker] = []
    try:
        pool = [_Worker(target) for _ in range(min(workers, len(items)))]
        while pending or any(w.task is not None for w in pool):
            for w in pool:
                if w.ready and w.task is None and pending:
                    i = pending.popleft()
                    tries[i] += 1
                    w.send(i, items[i])
            now = time.monotonic()
            waits = [w.t0 + timeout_s - now for w in pool if w.task is not None]
            timeout = max(0.01, min(waits)) if waits else 1.0
            readable, _, _ = select.select([w.fd for w in pool], [], [], timeout)
            for k, w in enumerate(pool):
                if w.fd not in readable:
                    continue
                got = w.lines()
                if got is None:  # died
                    if w.task is not None:
                        results[w.task] = (False, "error: grading worker died")
                    elif not w.ready:
                        raise RuntimeError(f"grading worker for {target} failed to start")
                    w.kill()
                    pool[k] = _Worker(target)
                    continue
                for line in got:
                    if line == _READY:
                        w.ready = True
                    elif w.task is not None:
                        msg = json.loads(line)
                        results[w.task] = (bool(msg["ok"]), msg["value"])
                        w.task = None
            now = time.monotonic()
            for k, w in enumerate(pool):
                if w.task is not None and now - w.t0 > timeout_s:
                    if tries[w.task] <= retries:
                        pending.appendleft(w.task)
                    else:
                        results[w.task] = (False, "timeout")
                    w.kill()
                    pool[k] = _Worker(target)
                elif not w.ready and now - w.born > startup_timeout_s:
                    raise RuntimeError(f"grading worker for {target} did not start within {startup_timeout_s:g} s")
    except Exception as e:  # noqa: BLE001 - whatever is unfinished is reported, not raised
        for i, r in enumerate(results):
            if r is None:
                results[i] = (False, f"error: {type(e).__name__}: {e}")
    finally:
        for w in pool:
            w.kill()
    return [r if r is not None else (False, "error: not run") for r in results]


if __name__ == "__main__":  # pragma: no cover
    _serve(sys.argv[1])
