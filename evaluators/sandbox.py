"""Run untrusted Python programs in an isolated, resource-limited process.

One call of :func:`run_program` runs one program and says whether it *finished*: the harness
prints a random nonce on a private pipe only after the whole program (candidate code followed by
the benchmark's tests) has run without an exception. Anything else — an early ``sys.exit(0)`` or
``os._exit(0)``, a crash, a signal, a timeout, a fork bomb that runs out of processes — is a
failure, never a pass and never an exception in the caller.

Isolation, best first (:func:`isolation_mode` picks the first that works here, once per process;
``AROPD_SANDBOX=bwrap|unshare|rlimits`` forces one):

``bwrap``
    Bubblewrap: read-only root, private ``/tmp`` (a fresh tmpfs of ``Limits.tmp_mb``, also the
    working directory),
    fresh ``/dev`` and ``/proc``, new PID / network / IPC / UTS namespaces (network = loopback
    only), ``--die-with-parent``, ``--new-session``, a cleared environment. When the grader runs as
    root, bwrap runs privileged and the harness drops to a random unprivileged uid/gid before the
    program starts (``RLIMIT_NPROC`` does not bind uid 0); directories on the interpreter's path
    that such a uid could not traverse (``/root`` is often 0700) are covered with a tmpfs and the
    interpreter's own directories bound back read-only. An interpreter or virtual environment under
    ``/tmp`` is bound back the same way over the private ``/tmp``.
``unshare``
    ``unshare(1)``: new PID (``--kill-child``), mount, network, IPC and UTS namespaces (plus a user
    namespace when not root). Inside, the harness mounts a private tmpfs of ``Limits.tmp_mb`` on
    its working directory and remounts every other mount read-only, then drops to a random uid (root) or drops all
    capabilities (user namespace).
``rlimits``
    Last resort (no namespaces could be created): resource limits, a private temporary directory,
    a clean environment, its own process group, and as root a random unprivileged uid whose
    processes are all killed afterwards. Refused as root when the interpreter is not reachable by
    an unprivileged uid. Weaker by nature: no network isolation, and as a normal user the program
    can write wherever that user can and a child that leaves the process group (``setsid``) can
    outlive the run. ``results.json`` records the mode, so such runs are visible.

In every mode the harness sets ``RLIMIT_CPU``, ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE``,
``RLIMIT_NPROC``, ``RLIMIT_NOFILE`` and ``RLIMIT_CORE=0`` before the program runs, stdin is
``/dev/null``, stdout/stderr go to a size-limited file, and the wall-clock limit kills the whole
process group (and with it the PID namespace, whose processes the kernel kills when its first
process dies — so children that called ``setsid`` do not outlive the run either).

Time limits count the program's own execution, not the sandbox's: on a busy machine creating the
namespaces and starting the interpreter can take seconds, and a correct program must not be graded
wrong for it. The harness writes one byte on a second pipe just before it runs the program's first
line; the wall-clock limit (``Limits.timeout_s``) runs from that byte, the start-up before it has
its own, generous limit (``Limits.startup_s``), and the CPU limit leaves out the CPU the harness
spent starting. A run that times out — whichever limit — is run once more before it counts as a
failure (a load spike is brief, a hang is not), and the reason names the limit and the retry:
``timeout (cpu 10 s)``, ``timeout (wall 10 s after start)``, ``timeout (sandbox start-up 60 s)``,
``passed on retry (first attempt: …)``, ``… (on retry; first attempt: …)``.

The harness's nonce lives in the harness's own memory; the sandbox defends against accidents and
sloppy code (early exits, hangs, forks, memory hogs, stray writes, network calls), not against a
program written to read the grader's memory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import secrets
import select
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MODES = ("bwrap", "unshare", "rlimits")


@dataclass(frozen=True)
class Limits:
    """Per-program limits. ``timeout_s`` is wall clock from the program's first line; CPU time is
    limited to ``cpu_s`` (``None``: the same budget). ``startup_s`` bounds the sandbox's own
    start-up before that line, separately, so a slow start never eats into the program's time."""

    timeout_s: float = 10.0
    cpu_s: float | None = None
    startup_s: float = 60.0
    memory_mb: int = 2048
    file_size_mb: int = 16
    nproc: int = 64
    nofile: int = 256
    tmp_mb: int = 512  # private /tmp (bwrap, when it has --size) / working directory (unshare) size


@dataclass(frozen=True)
class RunResult:
    passed: bool
    reason: str  # "passed" | "timeout (<limit>)" | "failed: <Exception>: msg" | "exited early ..." | ...
    elapsed_s: float  # all attempts together, sandbox start-up included
    isolation: str
    output_tail: str = ""
    attempts: int = 1


# ----------------------------------------------------------------------------------------------
# The harness: runs inside the sandbox as ``python -I -B -c HARNESS CONFIG_JSON``. It reads the
# nonce line and the program from stdin, sets up what the mode needs, sets the limits, writes one
# byte to the start fd (the parent's wall clock for the program starts then), runs the program
# with ``exec`` and writes ``PASS <nonce>`` to the result fd only when it returned.
# ----------------------------------------------------------------------------------------------
HARNESS = r'''
import os, sys, json, resource, math, signal, time
def _mounts(cfg):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    def mount(src, tgt, fs, flags, data=None):
        enc = lambda s: None if s is None else s.encode()
        if libc.mount(enc(src), enc(tgt), enc(fs), flags, enc(data)) != 0:
            e = ctypes.get_errno(); raise OSError(e, "mount %s: %s" % (tgt, os.strerror(e)))
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
    ATIME = {"noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}
    mount(None, "/", None, REC | PRIVATE)
    fds = [(p, os.open(p, os.O_PATH)) for p in cfg["binds"]]
    for a in cfg["covers"]:
        mount("tmpfs", a, "tmpfs", NOSUID | NODEV, "mode=0755")
    for p, fd in fds:
        os.makedirs(p, exist_ok=True)
        mount("/proc/self/fd/%d" % fd, p, None, BIND | REC)
        os.close(fd)
    wd = cfg["workdir"]
    mount("tmpfs", wd, "tmpfs", NOSUID | NODEV, "size=%d,mode=0700" % cfg["tmp_bytes"])
    if cfg.get("uid") is not None:
        os.chown(wd, cfg["uid"], cfg["uid"])
    unescape = lambda s: s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
    for line in open("/proc/self/mountinfo").read().splitlines():
        f = line.split()
        mp, opts = unescape(f[4]), f[5].split(",")
        if mp == wd:
            continue
        flags = BIND | REMOUNT | RDONLY
        flags |= (NOSUID if "nosuid" in opts else 0) | (NODEV if "nodev" in opts else 0) | (NOEXEC if "noexec" in opts else 0)
        flags |= sum(v for k, v in ATIME.items() if k in opts)
        try:
            mount(None, mp, None, flags)
        except OSError:
            if mp == "/":
                raise
def _drop_caps():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    if libc.syscall(126, hdr, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
def _no_new_privs():
    import ctypes
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
def _flush():
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except BaseException:
            pass
def _main():
    cfg = json.loads(sys.argv[1])
    out = cfg["fd"]
    data = sys.stdin.buffer.read()
    nonce, _, program = data.partition(b"\n")
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    me = os.getpid()
    # Report the CPU limit ourselves: unshare(1) does not pass on its child's death by a signal
    def _cpu(signum, frame):
        if os.getpid() == me:
            _flush()
            os.write(out, b"CPU")
            os._exit(4)
        signal.signal(signal.SIGXCPU, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGXCPU)
    signal.signal(signal.SIGXCPU, _cpu)
    try:
        if cfg.get("mounts"):
            _mounts(cfg)
        _no_new_privs()
        if cfg.get("uid") is not None:
            os.setgroups([])
            os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        elif cfg.get("drop_caps"):
            _drop_caps()
        lim = cfg["limits"]
        # RLIMIT_CPU counts the whole process: add what start-up used so the program gets all of its own
        t = os.times()
        cpu = math.ceil(lim["cpu_s"] + t.user + t.system)
        for name, val in (("RLIMIT_CPU", (cpu, cpu + 1)), ("RLIMIT_AS", lim["as"]), ("RLIMIT_FSIZE", lim["fsize"]),
                          ("RLIMIT_NPROC", lim["nproc"]), ("RLIMIT_NOFILE", lim["nofile"]), ("RLIMIT_CORE", 0)):
            v = val if isinstance(val, tuple) else (val, val)
            resource.setrlimit(getattr(resource, name), v)
        os.chdir(cfg["workdir"])
        if cfg.get("startup_delay_s"):
            time.sleep(cfg["startup_delay_s"])
        os.write(cfg["start_fd"], b"S")
        os.close(cfg["start_fd"])  # the program cannot reach it
    except BaseException as e:
        os.write(out, ("SETUP %s: %s" % (type(e).__name__, e)).encode()[:2000])
        os._exit(3)
    ns = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    try:
        exec(compile(program, "<program>", "exec"), ns)
    except BaseException as e:
        if os.getpid() == me:
            _flush()
            try:
                os.write(out, ("FAIL %s: %s" % (type(e).__name__, str(e)[:300])).encode("utf-8", "replace"))
            except BaseException:
                pass
        os._exit(1)
    if os.getpid() == me:
        _flush()
        os.write(out, b"PASS " + nonce)
    os._exit(0)
_main()
'''


# ----------------------------------------------------------------------------------------------
# Paths the interpreter needs, and which of them an unprivileged uid cannot reach.
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def interpreter_paths() -> tuple[str, ...]:
    """Minimal set of (real) directories holding the interpreter, its standard library and site
    packages."""
    cands = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))}
    cands.update(v for k, v in sysconfig.get_paths().items() if k in ("stdlib", "platstdlib", "purelib", "platlib"))
    try:
        cands.update(site.getsitepackages())
    except AttributeError:  # pragma: no cover
        pass
    real = sorted({os.path.realpath(p) for p in cands if p and os.path.isdir(p)})
    out: list[str] = []
    for p in real:  # sorted, so a parent comes before its children
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return tuple(out)


def _ancestors(path: str) -> list[str]:
    parts = Path(path).parts[1:]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


def _untraversable_covers(paths: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(covers, binds): the topmost ancestors an unprivileged uid cannot traverse (to be covered
    by a tmpfs) and the needed paths below them (to be bound back read-only)."""
    covers: list[str] = []
    for p in paths:
        for a in _ancestors(p):
            if any(a == c or a.startswith(c + "/") for c in covers):
                break
            if not os.stat(a).st_mode & 0o001:
                covers.append(a)
                break
    binds = [p for p in paths if any(p.startswith(c + "/") for c in covers)]
    return covers, binds


def _reachable_by_other(paths: tuple[str, ...]) -> bool:
    return not _untraversable_covers(paths)[0]


# ----------------------------------------------------------------------------------------------
# Mode detection
# ----------------------------------------------------------------------------------------------
def _is_root() -> bool:
    return os.geteuid() == 0


def _random_uid() -> int:
    # A high uid that no real account uses; one per run, so RLIMIT_NPROC counts only this run.
    return 1_500_000_000 + secrets.randbelow(500_000_000)


@functools.lru_cache(maxsize=None)
def isolation_mode() -> str:
    """The isolation :func:`run_program` uses here (probed once per process)."""
    forced = os.environ.get("AROPD_SANDBOX")
    if forced:
        if forced not in MODES:
            raise ValueError(f"AROPD_SANDBOX={forced!r}: expected one of {MODES}")
        return forced
    for mode in MODES:
        if _probe(mode):
            return mode
    raise RuntimeError(
        "no usable code sandbox: bubblewrap and unshare failed and, running as root, the Python "
        f"interpreter ({sys.executable}) is not reachable by an unprivileged uid; install "
        "bubblewrap (Debian package `bubblewrap`) or run the grader as a normal user")


def _probe(mode: str) -> bool:
    if mode == "bwrap" and not shutil.which("bwrap"):
        return False
    if mode == "unshare" and not shutil.which("unshare"):
        return False
    if mode == "rlimits" and _is_root() and not _reachable_by_other(interpreter_paths()):
        return False
    try:
        r = run_program("x = 1\n", Limits(timeout_s=20, startup_s=20), mode=mode, retries=0)
    except Exception:
        return False
    return r.passed


# ----------------------------------------------------------------------------------------------
# Command lines
# ----------------------------------------------------------------------------------------------
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONHASHSEED": "0",
}


def _python_cmd(cfg: dict) -> list[str]:
    return [sys.executable, "-I", "-B", "-c", HARNESS, json.dumps(cfg)]


@functools.lru_cache(maxsize=None)
def _bwrap_has_size() -> bool:
    """bwrap >= 0.8 can cap a tmpfs (``--size``)."""
    try:
        out = subprocess.run([shutil.which("bwrap") or "bwrap", "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return "--size" in out.stdout + out.stderr


def _bwrap_cmd(cfg: dict, root: bool, tmp_mb: int = 512) -> tuple[list[str], dict]:
    paths = interpreter_paths()
    cmd = [shutil.which("bwrap") or "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--perms", "1777"]
    if _bwrap_has_size():
        cmd += ["--size", str(tmp_mb * 2**20)]
    cmd += ["--tmpfs", "/tmp"]
    binds: list[str] = [p for p in paths if p.startswith("/tmp/")]
    covers: list[str] = ["/tmp"]
    if root:
        more, under = _untraversable_covers(paths)
        for c in more:
            cmd += ["--perms", "0755", "--tmpfs", c]
        covers += more
        binds += under
    made: set[str] = set()
    for b in sorted(set(binds)):
        for a in _ancestors(b):  # bwrap would create missing parents 0700; make them 0755
            if a not in made and any(a.startswith(c + "/") for c in covers):
                cmd += ["--perms", "0755", "--dir", a]
                made.add(a)
        cmd += ["--ro-bind", b, b]
    cmd += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv", "--chdir", "/tmp"]
    if not root:
        cmd += ["--unshare-user"]
    else:
        cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    env = dict(_ENV, HOME="/tmp", TMPDIR="/tmp")
    for k, v in env.items():
        cmd += ["--setenv", k, v]
    cfg.update(workdir="/tmp", uid=_random_uid() if root else None)
    return cmd + ["--"] + _python_cmd(cfg), {"PATH": _ENV["PATH"]}


def _unshare_cmd(cfg: dict, root: bool, workdir: str, tmp_mb: int = 512) -> tuple[list[str], dict]:
    cmd = [shutil.which("unshare") or "unshare", "--fork", "--pid", "--kill-child", "--mount-proc", "--mount", "--propagation", "private",
           "--net", "--ipc", "--uts"]
    covers, binds = ([], [])
    if root:
        covers, binds = _untraversable_covers(interpreter_paths())
        cfg.update(uid=_random_uid())
    else:
        cmd += ["--user", "--map-root-user"]
        cfg.update(drop_caps=True)
    cfg.update(mounts=True, covers=covers, binds=binds, workdir=workdir, tmp_bytes=tmp_mb * 2**20)
    return cmd + ["--"] + _python_cmd(cfg), dict(_ENV, HOME=workdir, TMPDIR=workdir)


def _rlimits_cmd(cfg: dict, root: bool, workdir: str) -> tuple[list[str], dict]:
    if root:
        if not _reachable_by_other(interpreter_paths()):
            raise RuntimeError("rlimits sandbox as root needs an interpreter an unprivileged uid can reach")
        cfg.update(uid=_random_uid())
    cfg.update(workdir=workdir)
    return _python_cmd(cfg), dict(_ENV, HOME=workdir, TMPDIR=workdir)


# ----------------------------------------------------------------------------------------------
# Running one program
# ----------------------------------------------------------------------------------------------
def _kill_uid(uid: int) -> None:
    """SIGKILL every process owned by ``uid`` (the run's private uid), until none is left."""
    for _ in range(50):
        found = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    found = True
                    os.kill(int(pid), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
        if not found:
            return
        time.sleep(0.02)


# Set only by tests: seconds the harness sleeps before the program starts, as a slow sandbox
# start-up on a busy machine would take.
_startup_delay_s = 0.0


def run_program(program: str, limits: Limits = Limits(), mode: str | None = None,
                tag: str | None = None, retries: int = 1) -> RunResult:
    """Run ``program`` (source text) in the sandbox; ``passed`` only if it ran to the end.

    A run that hits a time limit is run again, up to ``retries`` times, before it counts: a
    correct program slowed by a load spike on the grading machine passes the second time, a
    program that hangs fails twice. ``tag`` is appended to the harness's command line (not
    secret) so that tests can look for leftover processes of one run."""
    mode = mode or isolation_mode()
    first, timed_out = _run_once(program, limits, mode, tag)
    res, elapsed, attempts = first, first.elapsed_s, 1
    while timed_out and attempts <= retries:
        res, timed_out = _run_once(program, limits, mode, tag)
        elapsed += res.elapsed_s
        attempts += 1
    if attempts == 1:
        return res
    reason = (f"passed on retry (first attempt: {first.reason})" if res.passed
              else f"{res.reason} (on retry; first attempt: {first.reason})")
    return dataclasses.replace(res, reason=reason, elapsed_s=elapsed, attempts=attempts)


def _run_once(program: str, limits: Limits, mode: str, tag: str | None) -> tuple[RunResult, bool]:
    """One sandboxed run: its result, and whether a time limit ended it."""
    root = _is_root()
    nonce = secrets.token_hex(16)
    cpu_s = limits.timeout_s if limits.cpu_s is None else limits.cpu_s
    r_fd, w_fd = os.pipe()
    s_r, s_w = os.pipe()
    cfg = {"fd": w_fd, "start_fd": s_w, "startup_delay_s": _startup_delay_s, "limits": {
        "cpu_s": cpu_s, "as": limits.memory_mb * 2**20, "fsize": limits.file_size_mb * 2**20,
        "nproc": limits.nproc, "nofile": limits.nofile}}
    hostdir = tempfile.mkdtemp(prefix="aropd-sbx-")
    workdir = os.path.join(hostdir, "work")
    os.mkdir(workdir, 0o700)
    log_path = os.path.join(hostdir, "output.log")
    start = time.monotonic()
    proc = None
    try:
        if mode == "bwrap":
            cmd, env = _bwrap_cmd(cfg, root, limits.tmp_mb)
        elif mode == "unshare":
            cmd, env = _unshare_cmd(cfg, root, workdir, limits.tmp_mb)
        elif mode == "rlimits":
            cmd, env = _rlimits_cmd(cfg, root, workdir)
        else:
            raise ValueError(f"unknown sandbox mode {mode!r}; expected one of {MODES}")
        if cfg.get("uid") is not None and mode != "bwrap":
            os.chmod(hostdir, 0o711)  # traversable, not listable, by the run's uid
            os.chown(workdir, cfg["uid"], cfg["uid"])
        if tag:
            cmd.append(tag)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                    pass_fds=(w_fd, s_w), env=env, cwd=workdir, start_new_session=True,
                                    close_fds=True)
        for fd in (w_fd, s_w):
            os.close(fd)
        w_fd = s_w = -1
        try:
            limit_hit = _feed_and_wait(proc, nonce.encode() + b"\n" + program.encode("utf-8", "surrogateescape"),
                                       s_r, start, limits)
        finally:
            _kill_group(proc)
            if cfg.get("uid") is not None and mode == "rlimits":
                _kill_uid(cfg["uid"])
        elapsed = time.monotonic() - start
        os.set_blocking(r_fd, False)
        try:
            msg = os.read(r_fd, 4096).decode("utf-8", "replace")
        except BlockingIOError:
            msg = ""
        tail = _tail(log_path)
        if msg == f"PASS {nonce}":
            return RunResult(True, "passed", elapsed, mode, tail), False
        timed_out = limit_hit is not None
        if limit_hit == "start-up":
            reason = f"timeout (sandbox start-up {limits.startup_s:g} s)"
        elif limit_hit == "wall":
            reason = f"timeout (wall {limits.timeout_s:g} s after start)"
        elif msg == "CPU":
            reason, timed_out = f"timeout (cpu {cpu_s:g} s)", True
        elif msg.startswith("FAIL "):
            reason = "failed: " + msg[5:]
        elif msg.startswith("SETUP "):
            reason = "sandbox setup failed: " + msg[6:]
        elif msg.startswith("PASS "):
            reason = "tampered with the harness (wrong completion marker)"
        else:
            rc = proc.returncode
            if rc is not None and (rc < 0 or rc > 128):
                sig = -rc if rc < 0 else rc - 128
                try:
                    name = signal.Signals(sig).name
                except ValueError:
                    name = str(sig)
                timed_out = name == "SIGXCPU"  # the program took the harness's SIGXCPU handler away
                reason = f"timeout (cpu {cpu_s:g} s)" if timed_out else f"killed by {name}"
            else:
                reason = f"exited before the tests finished (exit code {rc})"
        return RunResult(False, reason, elapsed, mode, tail), timed_out
    finally:
        for fd in (w_fd, s_w):
            if fd >= 0:
                os.close(fd)
        os.close(r_fd)
        os.close(s_r)
        if proc is not None and proc.poll() is None:  # pragma: no cover - belt and braces
            _kill_group(proc)
        shutil.rmtree(hostdir, ignore_errors=True)


def _feed_and_wait(proc: subprocess.Popen, data: bytes, start_fd: int, t0: float, limits: Limits) -> str | None:
    """Write ``data`` to the child's stdin (from a thread: a child that never reads cannot block us)
    and wait for it to exit: ``None`` if it did in time, else the limit that ran out, ``"start-up"``
    (``limits.startup_s`` from ``t0`` without the harness's start byte on ``start_fd``) or
    ``"wall"`` (``limits.timeout_s`` from that byte). Waits on a pidfd where the kernel has them
    (exact wake-up), else polls."""

    def feed() -> None:
        try:
            proc.stdin.write(data)
        except (BrokenPipeError, OSError, ValueError):
            pass
        finally:
            try:
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    phase, deadline = "start-up", t0 + limits.startup_s
    watch = [start_fd]
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return phase
            fds = watch + ([pidfd] if pidfd is not None else [])
            ready, _, _ = select.select(fds, [], [], left if pidfd is not None else min(left, 0.05))
            if start_fd in ready:
                watch = []
                if os.read(start_fd, 1):  # the program's first line runs now: its own clock starts
                    phase, deadline = "wall", time.monotonic() + limits.timeout_s
                # else EOF: the harness ended before the program ran, and its exit follows
            if (pidfd in ready) if pidfd is not None else (proc.poll() is not None):
                proc.wait()
                return None
    finally:
        if pidfd is not None:
            os.close(pidfd)
        writer.join(timeout=5)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover
        proc.kill()
        proc.wait()


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
