"""A sandbox for model-written Python: program-of-thought and tool-integrated solutions (paper §3, §6).

The code is hostile until proven otherwise. It runs in a child forked from a warm server process (sympy, numpy,
fractions already imported, so a snippet takes milliseconds, not the second an import of sympy costs). The
server is started with an empty environment, so no secret of the training process is ever in its memory.
Each child, before running the code, puts up these walls, each stopping what the others might miss:

| layer | stops |
|---|---|
| own session and process group; killed as a group at the deadline | runaway loops, stray children |
| rlimits: address space, CPU seconds, file size, open files, processes (0: no fork) | memory, CPU, disk, fork storms |
| a private network namespace (unshare, where the kernel allows it) | any network connection |
| privileges dropped to `nobody` when run as root | signalling the server or other processes, reading root's files |
| empty environment, a fresh temporary directory as cwd and HOME | reading the parent's secrets, littering |
| an audit hook (PEP 578): no process creation, sockets, signals, ctypes, no writes outside the temporary directory, no reads outside Python's own installation | all of the above from Python, and reading the gold answers off disk |
| output capped at 64 KiB per stream | flooding the parent |

What it cannot stop: a bug in CPython or a C extension that gives memory corruption (audit hooks are a Python
layer; the rlimits, the uid and the namespace are the kernel's). Without root the uid wall is missing, and
without user namespaces the network wall is the audit hook alone; `Sandbox().layers` says what is up.

    from sandbox import run_python
    run_python("import sympy; print(sympy.factor('x**2 - 1'))").stdout   # '(x - 1)*(x + 1)\\n'
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass

OUTPUT_CAP = 64 * 1024
MEMORY_BYTES = 1 << 30  # above what the warm server already maps
FILE_BYTES = 16 << 20
NOBODY = 65534


@dataclass
class Result:
    ok: bool  # exited normally within the time limit
    stdout: str
    error: str | None  # the exception line (e.g. "ZeroDivisionError: division by zero"), "timeout", or None
    seconds: float = 0.0


# -----------------------------------------------------------------------------
# Inside the child: confinement, then the code


def _audit_hook(tmp, read_roots):
    blocked = ("os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "subprocess.Popen",
               "os.kill", "os.killpg", "signal.pthread_kill", "socket.", "ctypes.", "os.setuid", "pty.spawn",
               "sys.remote_exec", "_posixsubprocess")
    mutate = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
              "os.truncate", "os.utime", "shutil.rmtree", "shutil.copy", "shutil.move")
    writes = [0]

    def inside(path, roots):
        try:
            p = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return any(p == r or p.startswith(r + os.sep) for r in roots)

    def hook(event, args):
        if event.startswith(blocked):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].split(".")[0] in ("ctypes", "_ctypes", "cffi", "socket", "_socket",
                                                           "subprocess", "multiprocessing", "pty"):
            raise PermissionError(f"sandbox: import {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            writing = (mode and any(c in str(mode) for c in "wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writing:
                if not inside(path, [tmp]):
                    raise PermissionError(f"sandbox: no writing outside the sandbox's directory ({path})")
                writes[0] += 1
                if writes[0] > 64:
                    raise PermissionError("sandbox: too many files written")
            elif not inside(path, read_roots):
                raise PermissionError(f"sandbox: no reading {path}")
        if event.startswith(mutate) and not all(inside(a, [tmp]) for a in args if isinstance(a, (str, bytes))):
            raise PermissionError(f"sandbox: {event} outside the sandbox's directory")
    return hook


def _confine(tmp, timeout):
    import resource
    os.setsid()  # its own session and process group: killed as one
    vm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                vm = int(line.split()[1]) * 1024
    for lim, val in ((resource.RLIMIT_AS, vm + MEMORY_BYTES), (resource.RLIMIT_CPU, int(timeout) + 1),
                     (resource.RLIMIT_FSIZE, FILE_BYTES), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(lim, (val, val))
    layers = dict(rlimits=True, audit_hook=True, private_network=False, dropped_to_nobody=False)
    try:  # a private network namespace: no interfaces but a down loopback
        import ctypes
        layers["private_network"] = ctypes.CDLL(None, use_errno=True).unshare(0x40000000) == 0  # CLONE_NEWNET
    except (OSError, AttributeError):
        pass
    if os.getuid() == 0:
        os.chown(tmp, NOBODY, NOBODY)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        layers["dropped_to_nobody"] = True
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no new process for this user from here on
    os.chdir(tmp)
    os.environ.clear()
    os.environ.update(HOME=tmp, PATH="/usr/bin:/bin", TMPDIR=tmp)
    tempfile.tempdir = tmp
    roots = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, tmp)} |
                   {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p) and "site-packages" in p})
    sys.addaudithook(_audit_hook(os.path.realpath(tmp), roots + ["/dev/null", "/dev/urandom", "/usr/share/zoneinfo"]))
    return layers


def _child(code, tmp, timeout, out_w, err_w):
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    try:
        layers = _confine(tmp, timeout)
        exec(compile(code, "<model code>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__,
                                                      "__sandbox_layers__": layers})
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 0
    except BaseException as e:  # noqa: BLE001  report it like Python would: the last line is the error
        traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


# -----------------------------------------------------------------------------
# The server: fork, watch, kill, report


def _run_one(code, timeout):
    tmp = tempfile.mkdtemp(prefix="sandbox-")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(err_r)
        _child(code, tmp, timeout, out_w, err_w)
    os.close(out_w)
    os.close(err_w)
    bufs, open_fds, flooded = {out_r: b"", err_r: b""}, {out_r, err_r}, False
    deadline = t0 + timeout
    while open_fds and time.monotonic() < deadline and not flooded:
        ready, _, _ = select.select(list(open_fds), [], [], max(0.0, deadline - time.monotonic()))
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.discard(fd)
            bufs[fd] += chunk
            flooded |= len(bufs[fd]) > OUTPUT_CAP
    timed_out = bool(open_fds) and not flooded
    try:
        os.killpg(pid, signal.SIGKILL)  # the whole group, whatever it is doing
    except (ProcessLookupError, PermissionError):
        pass
    _, status = os.waitpid(pid, 0)
    for fd in (out_r, err_r):
        os.close(fd)
    shutil.rmtree(tmp, ignore_errors=True)
    stdout = bufs[out_r][:OUTPUT_CAP].decode("utf-8", "replace")
    stderr = bufs[err_r][:OUTPUT_CAP].decode("utf-8", "replace").strip()
    if timed_out:
        return dict(ok=False, stdout=stdout, error="timeout", seconds=time.monotonic() - t0)
    if flooded:
        return dict(ok=False, stdout=stdout, error="output limit exceeded", seconds=time.monotonic() - t0)
    code_ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    error = None
    if not code_ok:
        error = stderr.splitlines()[-1] if stderr else (
            f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit status {os.WEXITSTATUS(status)}")
    return dict(ok=code_ok, stdout=stdout, error=error, seconds=time.monotonic() - t0)


# Imported once by the server, inherited by every child. Children run as `nobody`, who may not be able to read
# the Python installation (under /root, say): what is not preloaded here may then not be importable.
PRELOAD = ("math", "cmath", "fractions", "decimal", "statistics", "itertools", "functools", "collections", "re",
           "random", "string", "heapq", "bisect", "datetime", "operator", "copy", "json", "typing", "numbers",
           "numpy", "sympy")


def _serve():
    """The server loop: one JSON request per line on stdin, one JSON result per line on stdout."""
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's Ctrl-C is the parent's to handle
    out = sys.stdout
    sys.stdout = open(os.devnull, "w")  # nothing else may write to the protocol channel
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        out.write(json.dumps(_run_one(req["code"], req["timeout"])) + "\n")
        out.flush()


# -----------------------------------------------------------------------------
# The client


class Sandbox:
    """A handle on one sandbox server, started on first use and restarted if it dies. Thread-safe."""

    def __init__(self):
        self.proc, self.lock = None, threading.Lock()

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env={"PATH": "/usr/bin:/bin"}, text=True, start_new_session=True)
        if json.loads(self.proc.stdout.readline() or "{}").get("ready") is not True:
            raise RuntimeError("the sandbox server did not start (is sympy installed?)")

    def run(self, code, timeout=5.0):
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            try:
                self.proc.stdin.write(json.dumps({"code": str(code), "timeout": float(timeout)}) + "\n")
                self.proc.stdin.flush()
                ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 10)
                line = self.proc.stdout.readline() if ready else ""
                if not line:
                    raise RuntimeError("no answer")
                return Result(**json.loads(line))
            except (RuntimeError, BrokenPipeError, json.JSONDecodeError, OSError):
                self.close()  # a fresh server next time
                return Result(ok=False, stdout="", error="sandbox failure")

    @property
    def layers(self):
        """Which walls came up on this machine, as a child reports them."""
        probe = self.run("import json\nprint(json.dumps(__sandbox_layers__))")
        return json.loads(probe.stdout) if probe.ok else {}

    def close(self):
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            self.proc = None


_default = Sandbox()


def run_python(code, timeout=5.0):
    """Run untrusted Python; returns Result(ok, stdout, error, seconds). See the module docstring."""
    return _default.run(code, timeout)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        _serve()
    else:
        r = run_python(sys.stdin.read() if len(sys.argv) < 2 else sys.argv[1])
        print(r.stdout, end="")
        if r.error:
            print(f"[error] {r.error}", file=sys.stderr)
