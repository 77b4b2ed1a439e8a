"""The code sandbox against hostile and careless programs, in every isolation mode available here.

Each program runs as a real sandboxed subprocess (no mocks). A run counts as passed only if the
harness saw the program finish; all of these must fail, within their time limit, leave no process
behind and write nothing outside their own temporary directory.
"""

import os
import shutil
import socket
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aropd.evaluators import sandbox
from aropd.evaluators.sandbox import Limits, run_program

ROOT = Path(__file__).resolve().parents[1]
MODES = [m for m in ("bwrap", "unshare") if sandbox._probe(m)]
SLACK = 4.0  # seconds on top of a time limit for start-up and clean-up on a busy 2-core machine


def _procs_matching(needle: str) -> list[str]:
    """Command lines of live processes containing ``needle`` (zombies included)."""
    hits = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if needle in cmd:
            hits.append(f"{pid}: {cmd[:120]}")
    return hits


def test_some_isolation_is_available_and_bwrap_is_preferred():
    assert sandbox.isolation_mode() in sandbox.MODES
    if shutil.which("bwrap") and "bwrap" in MODES:
        assert sandbox.isolation_mode() == "bwrap"
    assert MODES, "neither bubblewrap nor unshare works here"


@pytest.mark.parametrize("mode", MODES)
def test_hostile_programs_fail_in_time_and_leave_nothing(mode, tmp_path, monkeypatch):
    tag = f"aropd-test-{uuid.uuid4().hex}"
    sleeper = "987.%d" % (uuid.uuid4().int % 1000)
    escape_targets = [tmp_path / "escape.txt", ROOT / "tests" / f".escape-{tag}",
                      Path("/var/tmp") / f"escape-{tag}", Path("/dev/shm") / f"escape-{tag}"]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]

    short = Limits(timeout_s=3)
    cases = {
        # name: (program, limits, substring expected in the reason)
        "infinite loop": ("while True:\n    pass\n", short, "timeout"),
        "sleeps forever": ("import time\ntime.sleep(1000)\n", short, "timeout"),
        "early sys.exit(0)": ("import sys\nsys.exit(0)\nassert False\n", short, "SystemExit"),
        "early os._exit(0)": ("import os\nos._exit(0)\n", short, "exited before the tests finished"),
        "fork bomb": ("import os\nwhile True:\n    os.fork()\n", short, "BlockingIOError"),
        "memory hog": ("x = []\nwhile True:\n    x.append(bytearray(32 * 2**20))\n",
                       Limits(timeout_s=8, memory_mb=256), "MemoryError"),
        "huge file": ("open('big.bin', 'wb').write(b'x' * (4 * 2**20))\n", Limits(timeout_s=5, file_size_mb=1),
                      "File too large"),
        "fills the disk": ("for i in range(40):\n    open(f'f{i}.bin', 'wb').write(b'x' * (2**20 - 1))\n",
                           Limits(timeout_s=8, file_size_mb=1, tmp_mb=16),
                           "No space left" if mode == "unshare" or sandbox._bwrap_has_size() else ""),
        "writes outside": (
            "import os\nok = 0\n"
            f"for p in {[str(p) for p in escape_targets]!r}:\n"
            "    try:\n        open(p, 'w').write('escaped')\n        ok += 1\n    except OSError:\n        pass\n"
            "raise SystemExit(0)\n", short, "SystemExit"),
        "network connect": (
            "import socket\n"
            f"socket.create_connection(('127.0.0.1', {port}), timeout=1)\n", short, "Error"),
        "internet connect": ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n", short, "Error"),
        "kills the parent": (
            "import os, signal\n"
            "for target in (os.getppid(), %d, -1):\n"
            "    try:\n        os.kill(target, signal.SIGKILL)\n    except OSError:\n        pass\n"
            "import time\ntime.sleep(0.5)\nraise SystemExit(0)\n" % os.getpid(), short, ""),
        "forges the marker": (
            "import os, sys, json\nos.write(json.loads(sys.argv[1])['fd'], b'PASS 00000000')\nos._exit(0)\n",
            short, "tampered"),
        "setsid child outlives": (
            "import subprocess, os\n"
            f"subprocess.Popen(['sleep', '{sleeper}'], start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(1000)\n"
            "os._exit(0)\n", short, "exited before the tests finished"),
    }

    def go(item):
        name, (prog, lim, _) = item
        # one attempt each: what is checked here is how one run ends (retries are tested below)
        return name, run_program(prog, lim, mode=mode, tag=tag, retries=0)

    with ThreadPoolExecutor(2) as ex:
        results = dict(ex.map(go, cases.items()))

    for name, (_, lim, want) in cases.items():
        r = results[name]
        assert not r.passed, f"{name}: passed ({r.reason})"
        assert r.isolation == mode
        assert want in r.reason, f"{name}: reason {r.reason!r} lacks {want!r}"
        assert r.elapsed_s < lim.timeout_s + SLACK, f"{name}: took {r.elapsed_s:.1f} s"
    for name in ("infinite loop", "sleeps forever"):
        assert results[name].elapsed_s >= 3.0
    # nothing left running: no harness process of this run, no session-escaped sleeper
    assert _procs_matching(tag) == []
    assert _procs_matching(f"sleep {sleeper}") == []
    # nothing written outside, no connection reached the host
    for p in escape_targets:
        assert not p.exists(), f"{p} was written from inside the sandbox"
        if p.exists():
            p.unlink()
    with pytest.raises(BlockingIOError):
        server.accept()
    server.close()


@pytest.mark.parametrize("mode", MODES)
def test_clean_environment_and_private_working_directory(mode, monkeypatch):
    monkeypatch.setenv("AROPD_TEST_SECRET_TOKEN", "hunter2")
    name = f"scratch-{uuid.uuid4().hex}.txt"
    prog = (
        "import os\n"
        "assert 'AROPD_TEST_SECRET_TOKEN' not in os.environ, 'parent environment leaked'\n"
        "assert not any('hunter2' in v for v in os.environ.values())\n"
        "assert os.environ['PATH'] and os.environ['HOME']\n"
        f"open({name!r}, 'w').write('kept inside')\n"
        f"assert open({name!r}).read() == 'kept inside'\n"
        "assert 'CapEff:\\t0000000000000000' in open('/proc/self/status').read(), 'capabilities left'\n"
        "import numpy\n"  # the interpreter's site-packages are reachable
    )
    r = run_program(prog, Limits(timeout_s=20), mode=mode)
    assert r.passed, r.reason + r.output_tail
    # the scratch file lived only in the sandbox's temporary directory
    hits = [str(p) for p in Path("/tmp").glob(f"**/{name}")]
    assert hits == []


@pytest.mark.parametrize("mode", MODES)
def test_output_tail_is_kept_and_exceptions_are_named(mode):
    r = run_program("print('hello from the sandbox')\nraise KeyError('k')\n", Limits(timeout_s=10), mode=mode)
    assert not r.passed
    assert r.reason.startswith("failed: KeyError")
    assert "hello from the sandbox" in r.output_tail


@pytest.mark.parametrize("mode", MODES)
def test_interpreter_in_a_virtualenv_under_tmp_still_runs(mode, tmp_path):
    """A sandbox with a private /tmp must bind back an interpreter that lives under /tmp."""
    import subprocess
    import venv

    assert str(tmp_path).startswith("/tmp/") or pytest.skip("pytest's tmp_path is not under /tmp here")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    py = env_dir / "bin" / "python"
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'evaluators')!r})\n"
        "import sandbox\n"
        "r = sandbox.run_program('import sys, json\\nassert sys.prefix.startswith(\"/tmp/\"), sys.prefix\\n', "
        f"sandbox.Limits(timeout_s=20), mode={mode!r})\n"
        "print(r.passed, r.reason)\n"
    )
    out = subprocess.run([str(py), "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True passed", out.stdout + out.stderr


@pytest.mark.parametrize("mode", MODES)
def test_the_wall_limit_starts_with_the_program_not_with_the_sandbox(mode, monkeypatch):
    """A start-up made 2 s slow (as on a busy machine) does not count against a 1 s limit: a 0.5 s
    sleep passes (2 + 0.5 s in all, more than the limit), a 1.5 s sleep still times out, after
    2 + 1 s, and a start-up slower than its own limit is a start-up timeout."""
    monkeypatch.setattr(sandbox, "_startup_delay_s", 2.0)
    sleep = "import time\ntime.sleep({})\n"
    r = run_program(sleep.format(0.5), Limits(timeout_s=1), mode=mode, retries=0)
    assert (r.passed, r.reason, r.attempts) == (True, "passed", 1), r.output_tail
    assert r.elapsed_s >= 2.5
    r = run_program(sleep.format(1.5), Limits(timeout_s=1), mode=mode, retries=0)
    assert (r.passed, r.reason) == (False, "timeout (wall 1 s after start)")
    assert 3.0 <= r.elapsed_s < 3.0 + SLACK
    r = run_program(sleep.format(0), Limits(timeout_s=10, startup_s=1), mode=mode, retries=0)
    assert (r.passed, r.reason) == (False, "timeout (sandbox start-up 1 s)")
    assert 1.0 <= r.elapsed_s < 1.0 + SLACK


@pytest.mark.parametrize("mode", MODES)
def test_a_busy_loop_hits_the_cpu_limit(mode):
    # a generous wall limit, so that only the CPU limit (1 s of the loop's own CPU) can end it
    r = run_program("while True:\n    pass\n", Limits(timeout_s=60, cpu_s=1), mode=mode, retries=0)
    assert (r.passed, r.reason) == (False, "timeout (cpu 1 s)")
    assert 1.0 <= r.elapsed_s < 60


@pytest.fixture
def shared_dir():
    """A directory the sandboxed program can read (outside the private /tmp, readable by the
    unprivileged uid it runs as)."""
    d = tempfile.mkdtemp(prefix="aropd-sandbox-test-", dir="/var/tmp")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def _count_attempts(monkeypatch, after=lambda: None) -> list:
    """Record each sandboxed attempt; ``after`` runs between attempts (the sandbox cannot write
    outside, so the test leaves the marker the program looks for)."""
    calls = []
    real = sandbox._run_once

    def once(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out[0].reason)
        after()
        return out

    monkeypatch.setattr(sandbox, "_run_once", once)
    return calls


@pytest.mark.parametrize("mode", MODES)
def test_a_timeout_is_retried_once_and_a_second_attempt_in_time_passes(mode, monkeypatch, shared_dir):
    marker = shared_dir / "second-attempt"
    calls = _count_attempts(monkeypatch, after=marker.touch)
    prog = f"import os, time\nif not os.path.exists({str(marker)!r}):\n    time.sleep(60)\n"
    r = run_program(prog, Limits(timeout_s=1), mode=mode)
    assert calls == ["timeout (wall 1 s after start)", "passed"]
    assert r.passed and r.attempts == 2
    assert r.reason == "passed on retry (first attempt: timeout (wall 1 s after start))"
    assert r.elapsed_s >= 1.0


@pytest.mark.parametrize("mode", MODES)
def test_a_program_that_always_times_out_fails_after_exactly_two_attempts(mode, monkeypatch):
    calls = _count_attempts(monkeypatch)
    r = run_program("import time\ntime.sleep(60)\n", Limits(timeout_s=1), mode=mode)
    assert calls == ["timeout (wall 1 s after start)"] * 2
    assert not r.passed and r.attempts == 2
    assert r.reason == "timeout (wall 1 s after start) (on retry; first attempt: timeout (wall 1 s after start))"
    assert 2.0 <= r.elapsed_s < 2 * (1.0 + SLACK)
    # a failure that is not a timeout is not retried
    calls.clear()
    r = run_program("raise ValueError('no')\n", Limits(timeout_s=1), mode=mode)
    assert (r.reason, r.attempts, len(calls)) == ("failed: ValueError: no", 1, 1)
