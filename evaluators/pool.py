"""A small process pool with a per-task timeout (``concurrent.futures`` cannot kill one hung task).

Workers are started with the ``spawn`` method (safe inside a process that holds threads, CUDA or a
distributed backend), import ``preload`` modules, say they are ready, then run tasks one at a time.
A task that exceeds ``timeout_s`` gets its worker killed and replaced; a worker that dies reports
the task as failed. Nothing here raises because of a task.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import time
import traceback
from collections import deque
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

_READY = "__ready__"


def _worker(conn, preload: Sequence[str]) -> None:  # pragma: no cover - runs in the child
    for name in preload:
        importlib.import_module(name)
    conn.send(_READY)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        func, args = msg
        try:
            conn.send((True, func(*args)))
        except BaseException as e:  # noqa: BLE001 - report, keep serving
            conn.send((False, f"error: {type(e).__name__}: {e}"[:500]))


def map_with_timeout(func: Callable[..., Any], items: Sequence[tuple], workers: int, timeout_s: float,
                     preload: Sequence[str] = ()) -> list[tuple[bool, Any]]:
    """``[(ok, value)]`` for ``func(*item)`` per item, in order; ``(False, reason)`` on a timeout
    (``"timeout"``), an exception or a dead worker. ``workers <= 0`` runs in this process (no
    timeout protection)."""
    if not items:
        return []
    if workers <= 0:
        out = []
        for args in items:
            try:
                out.append((True, func(*args)))
            except Exception as e:  # noqa: BLE001
                out.append((False, f"error: {type(e).__name__}: {e}"))
        return out

    ctx = mp.get_context("spawn")
    results: list[tuple[bool, Any] | None] = [None] * len(items)
    pending = deque(range(len(items)))
    slots: list[dict] = []

    def start() -> dict:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, tuple(preload)), daemon=True)
        p.start()
        child.close()
        return {"proc": p, "conn": parent, "ready": False, "task": None, "t0": 0.0}

    def stop(s: dict) -> None:
        if s["proc"].is_alive():
            s["proc"].kill()
        s["proc"].join(5)
        s["conn"].close()

    try:
        slots = [start() for _ in range(min(workers, len(items)))]
        while pending or any(s["task"] is not None for s in slots):
            for s in slots:
                if s["ready"] and s["task"] is None and pending:
                    i = pending.popleft()
                    s["task"], s["t0"] = i, time.monotonic()
                    s["conn"].send((func, items[i]))
            now = time.monotonic()
            deadlines = [s["t0"] + timeout_s - now for s in slots if s["task"] is not None]
            ready = wait([s["conn"] for s in slots], timeout=max(0.01, min(deadlines)) if deadlines else 1.0)
            for k, s in enumerate(slots):
                if s["conn"] in ready:
                    try:
                        msg = s["conn"].recv()
                    except (EOFError, OSError):
                        if s["task"] is not None:
                            results[s["task"]] = (False, "error: grading worker died")
                        elif not s["ready"]:
                            raise RuntimeError("grading worker failed to start")
                        stop(s)
                        slots[k] = start()
                        continue
                    if msg == _READY:
                        s["ready"] = True
                    else:
                        results[s["task"]] = msg
                        s["task"] = None
            now = time.monotonic()
            for k, s in enumerate(slots):
                if s["task"] is not None and now - s["t0"] > timeout_s:
                    results[s["task"]] = (False, "timeout")
                    stop(s)
                    slots[k] = start()
    except Exception:
        for i, r in enumerate(results):
            if r is None:
                results[i] = (False, "error: " + traceback.format_exc(limit=1).strip().splitlines()[-1])
    finally:
        for s in slots:
            try:
                s["conn"].send(None)
            except (OSError, ValueError):
                pass
        for s in slots:
            s["proc"].join(2)
            stop(s)
    return [r if r is not None else (False, "error: not run") for r in results]
