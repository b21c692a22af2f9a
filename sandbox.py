"""A sandbox for model-written Python: program-of-thought and tool-integrated solutions (paper §3, §6).

The code is hostile until proven otherwise. It runs in a child forked from a warm server process (sympy, numpy,
fractions already imported, so a snippet takes milliseconds, not the second an import of sympy costs). The
server is started with an empty environment, so no secret of the training process is ever in its memory.
Each child, before running the code, puts up these walls, each stopping what the others might miss:

- its own session and process group, killed as a group at the deadline: runaway loops, stray children;
- rlimits on address space, CPU seconds, file size, open files and processes (0: no fork): memory, CPU, disk and
  fork storms;
- a private network namespace (unshare, where the kernel allows it): any network connection;
- privileges dropped to `nobody` when run as root: signalling the server or other processes, reading root's files;
- private mounts when run as root: the temporary directory is a small no-exec tmpfs, and a directory `nobody` may
  not enter on the way to Python (`/root`, say) is covered by an empty tmpfs with Python's installation bound back
  at its own path, read-only: native code written by the program, reading what else lies there; and lazy imports
  (sympy's) keep working after the drop to `nobody`;
- an empty environment, a fresh temporary directory as cwd and HOME: reading the parent's secrets, littering;
- an audit hook (PEP 578): no process creation, sockets, signals, ctypes, native modules from the temporary
  directory, no writes outside it, no reads or listings outside Python's own installation: all of the above from
  Python, and finding or reading the gold answers on disk;
- output capped at 64 KiB per stream: flooding the parent.

Why private mounts rather than preloading: sympy imports modules at call time (`solve` pulls in
`sympy.tensor.tensor`), and a virtual environment under `/root` (mode 0700, the usual GPU container) is out of
`nobody`'s reach. Preloading every module that might be needed costs seconds and hundreds of MB per server and
still misses the standard library's; showing `nobody` the installation itself, read-only, misses nothing. Where
the kernel refuses a mount namespace (root without CAP_SYS_ADMIN, as in Docker's default profile), the server
says so once and imports all of sympy and numpy up front instead.

What it cannot stop: a bug in CPython or a C extension that gives memory corruption (audit hooks are a Python
layer; the rlimits, the uid, the namespaces and the no-exec mount are the kernel's). Without root the uid and mount
walls are missing, and without namespaces the network wall is the audit hook alone; `Sandbox().layers` says what
is up, and the first run in a process prints one line naming any wall that is down.

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
TMPFS_BYTES = 4 * FILE_BYTES  # the temporary directory's size, where it is a tmpfs of its own
NOBODY = 65534
ROOT = os.getuid() == 0
WALLS = ("rlimits", "private_network", "dropped_to_nobody", "private_mounts", "audit_hook")
CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18


@dataclass
class Result:
    ok: bool  # exited normally within the time limit
    stdout: str
    error: str | None  # the exception line (e.g. "ZeroDivisionError: division by zero"), "timeout", or None
    seconds: float = 0.0


def _inside(path, roots):
    try:
        p = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return any(p == r or p.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _installation(extra_paths=()):
    """The directories the code may read: Python's prefixes, its site-packages, and any extra paths."""
    dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, *extra_paths)}
    dirs |= {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p) and "-packages" in p}
    return sorted(d for d in dirs if not any(d != o and _inside(d, [o]) for o in dirs))  # outermost only


def _closed_ancestors(dirs):
    """The topmost directory above each of `dirs` that `nobody` may not enter (no search bit for others)."""
    closed = set()
    for d in dirs:
        parts = d.split(os.sep)
        for i in range(2, len(parts)):
            a = os.sep.join(parts[:i])
            if not os.stat(a).st_mode & 0o001:
                closed.add(a)
                break
    return sorted(closed)


# -----------------------------------------------------------------------------
# Inside the child: confinement, then the code


def _audit_hook(tmp, installation):
    blocked = ("os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "subprocess.Popen",
               "os.kill", "os.killpg", "signal.pthread_kill", "socket.", "ctypes.", "os.setuid", "pty.spawn",
               "sys.remote_exec", "_posixsubprocess")
    mutate = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
              "os.truncate", "os.utime", "shutil.rmtree", "shutil.copy", "shutil.move")
    readable = installation + [tmp, "/dev/null", "/dev/urandom", "/usr/share/zoneinfo"]
    writes = [0]

    def hook(event, args):
        if event.startswith(blocked):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import":
            if args[0].split(".")[0] in ("ctypes", "_ctypes", "cffi", "socket", "_socket", "subprocess",
                                         "multiprocessing", "pty"):
                raise PermissionError(f"sandbox: import {args[0]} is not allowed")
            if args[1] is not None and not _inside(args[1], installation):  # a native module's file
                raise PermissionError(f"sandbox: no native code from outside Python's installation ({args[1]})")
        if event in ("os.listdir", "os.scandir"):  # finding where the answers live is the first step to reading them
            if not isinstance(args[0], int) and not _inside(args[0] or ".", readable):
                raise PermissionError(f"sandbox: no listing {args[0]}")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            writing = ((mode and any(c in str(mode) for c in "wax+"))
                       or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing:
                if not _inside(path, [tmp]):
                    raise PermissionError(f"sandbox: no writing outside the sandbox's directory ({path})")
                writes[0] += 1
                if writes[0] > 64:
                    raise PermissionError("sandbox: too many files written")
            elif not _inside(path, readable):
                raise PermissionError(f"sandbox: no reading {path}")
        if event.startswith(mutate) and not all(_inside(a, [tmp]) for a in args if isinstance(a, (str, bytes))):
            raise PermissionError(f"sandbox: {event} outside the sandbox's directory")
    return hook


def _private_mounts(libc, tmp, installation, closed):
    """A mount namespace of the child's own: each closed directory (one `nobody` may not enter on the way to
    Python) is covered by an empty tmpfs and the installation's directories under it are bound back at their own
    paths, read-only; then `tmp` becomes a small no-exec tmpfs owned by nobody. False if the kernel refuses."""
    import ctypes

    def mount(src, dst, fstype, flags, data=None):
        enc = lambda x: x.encode() if x is not None else None  # noqa: E731
        if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
            raise OSError(ctypes.get_errno(), f"sandbox: mount {dst}: {os.strerror(ctypes.get_errno())}")

    if libc.unshare(CLONE_NEWNS) != 0:
        return False
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here reaches the host's mount table
    hidden = [d for d in installation if _inside(d, closed)]
    for i, d in enumerate(hidden):  # held at a staging point while the tmpfs covers their parents
        os.mkdir(f"{tmp}/{i}")
        mount(d, f"{tmp}/{i}", None, MS_BIND | MS_REC)
    for c in closed:
        mount("tmpfs", c, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
    for i, d in enumerate(hidden):
        os.makedirs(d, mode=0o755)
        mount(f"{tmp}/{i}", d, None, MS_MOVE)
        mount(None, d, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    mount("tmpfs", tmp, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"size={TMPFS_BYTES},mode=0700,uid={NOBODY},gid={NOBODY}")
    return True


def _confine(tmp, timeout, installation, closed, disabled):
    import ctypes
    import resource
    os.setsid()  # its own session and process group: killed as one
    os.umask(0o022)
    vm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                vm = int(line.split()[1]) * 1024
    for lim, val in ((resource.RLIMIT_AS, vm + MEMORY_BYTES), (resource.RLIMIT_FSIZE, FILE_BYTES),
                     (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(lim, (val, val))
    cpu = int(timeout) + 1  # a backstop behind the server's deadline: SIGXCPU, then SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    layers = dict.fromkeys(WALLS, False)
    layers["rlimits"] = True
    libc = ctypes.CDLL(None, use_errno=True)  # before the audit hook, which refuses ctypes
    layers["private_network"] = libc.unshare(CLONE_NEWNET) == 0  # no interfaces but a down loopback
    if ROOT:
        if "private_mounts" not in disabled:
            layers["private_mounts"] = _private_mounts(libc, tmp, installation, closed)
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
    if "audit_hook" not in disabled:
        sys.addaudithook(_audit_hook(os.path.realpath(tmp), installation))
        layers["audit_hook"] = True
    return layers


def _child(code, tmp, timeout, out_w, err_w, installation, closed, disabled):
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    try:
        layers = _confine(tmp, timeout, installation, closed, disabled)
        exec(compile(code, "<model code>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__,
                                                      "__sandbox_layers__": layers})
        status = 0
    except SystemExit as e:  # as Python exits: None is 0, a number is the status, anything else is printed, then 1
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
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


def _run_one(code, timeout, setup):
    tmp = tempfile.mkdtemp(prefix="sandbox-")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(err_r)
        _child(code, tmp, timeout, out_w, err_w, **setup)
    os.close(out_w)
    os.close(err_w)
    bufs, open_fds, flooded = {out_r: b"", err_r: b""}, {out_r, err_r}, False
    deadline = t0 + timeout + (60 if "deadline" in setup["disabled"] else 0)  # a test of the CPU rlimit alone
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
            f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
            else f"exit status {os.WEXITSTATUS(status)}")
    return dict(ok=code_ok, stdout=stdout, error=error, seconds=time.monotonic() - t0)


# Imported once by the server, inherited by every child: a snippet starts in milliseconds.
PRELOAD = ("math", "cmath", "fractions", "decimal", "statistics", "itertools", "functools", "collections", "re",
           "random", "string", "heapq", "bisect", "datetime", "operator", "copy", "json", "typing", "numbers",
           "numpy", "sympy")
THIRD_PARTY = ("numpy", "sympy")  # imported whole when the children cannot read the installation

# Run once at server start: which walls came up, and can the code read what it imports?
PROBE = """import json, os, sys
files = [d for d in {dirs}] + [m.__file__ for m in sys.modules.values() if getattr(m, '__file__', None)]
print(json.dumps(dict(layers=__sandbox_layers__, unreadable=sorted(f for f in files if not os.access(f, os.R_OK)))))"""

WHY_DOWN = {  # what stands in for a wall that did not come up
    "private_network": "no network namespace (the kernel refused unshare): the audit hook alone refuses sockets",
    "private_mounts": "no mount namespace (root without CAP_SYS_ADMIN): the audit hook alone refuses native "
                      "code written by the program",
    "dropped_to_nobody": "not run as root, so no drop to nobody and no private mounts: the rlimits and the audit "
                         "hook stand, and the code runs as this user",
}


def _import_everything(packages):
    import importlib
    import pkgutil
    for name in packages:
        for m in pkgutil.walk_packages(sys.modules[name].__path__, name + ".", onerror=lambda _: None):
            if not any(part in m.name for part in (".tests", ".testing", "__main__")):  # __main__ runs a CLI
                try:
                    importlib.import_module(m.name)
                except (Exception, SystemExit):  # noqa: BLE001  an optional dependency is missing: not needed then
                    pass


def _serve(options):
    """The server loop: one JSON request per line on stdin, one JSON result per line on stdout. Starts by
    probing its own walls, and says in its first line which did not come up and why."""
    import importlib
    paths = [os.path.realpath(p) for p in options.get("paths", [])]
    sys.path[:0] = paths
    for name in PRELOAD:
        importlib.import_module(name)
    installation = _installation(paths)
    closed = _closed_ancestors(installation) if ROOT else []
    setup = dict(installation=installation, closed=closed, disabled=options.get("disable", []))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's Ctrl-C is the parent's to handle
    out = sys.stdout
    sys.stdout = open(os.devnull, "w")  # nothing else may write to the protocol channel
    probe = _run_one(PROBE.format(dirs=installation), 30, setup)
    if not probe["ok"]:
        out.write(json.dumps({"ready": False, "error": probe["error"]}) + "\n")
        return
    report = json.loads(probe["stdout"])
    layers, notes = report["layers"], []
    for wall, why in WHY_DOWN.items():
        if not layers[wall] and wall not in setup["disabled"] and not (wall == "private_mounts" and not ROOT):
            notes.append(why)
    notes += [f"{wall} disabled (a test switch)" for wall in setup["disabled"]]
    if report["unreadable"]:  # nobody cannot read the installation, and no mount namespace shows it to them
        t0 = time.monotonic()
        _import_everything(THIRD_PARTY)
        notes.append(f"the sandbox's uid cannot read {report['unreadable'][0]} (and {len(report['unreadable']) - 1} "
                     f"more): imported all of {', '.join(THIRD_PARTY)} up front ({time.monotonic() - t0:.1f} s) "
                     f"so that their lazy imports work; other modules will not import. Fix: install Python where "
                     f"other users can read it, or allow a mount namespace (CAP_SYS_ADMIN)")
    out.write(json.dumps({"ready": True, "layers": layers, "notes": notes}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        out.write(json.dumps(_run_one(req["code"], req["timeout"], setup)) + "\n")
        out.flush()


# -----------------------------------------------------------------------------
# The client


class Sandbox:
    """A handle on one sandbox server, started on first use and restarted if it dies. Thread-safe.

    paths: extra directories the code may import from (read-only to it). disable: walls left down, for tests
    that check each of the others alone ("audit_hook", "private_mounts"; "deadline", so that the CPU rlimit
    ends a loop)."""

    _noted = set()  # walls-down lines already printed by this process

    def __init__(self, paths=(), disable=()):
        self.proc, self.lock, self._layers = None, threading.Lock(), None
        self.options = dict(paths=[str(p) for p in paths], disable=list(disable))

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), "--serve",
                                      json.dumps(self.options)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env={"PATH": "/usr/bin:/bin"}, text=True, start_new_session=True)
        hello = json.loads(self.proc.stdout.readline() or "{}")
        if hello.get("ready") is not True:
            self.close()
            raise RuntimeError(f"the sandbox server did not start: {hello.get('error', 'is sympy installed?')}")
        self._layers = hello["layers"]
        line = "; ".join(hello["notes"])
        if line and line not in Sandbox._noted:
            Sandbox._noted.add(line)
            print(f"sandbox: {line}", file=sys.stderr)

    def run(self, code, timeout=5.0):
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            try:
                self.proc.stdin.write(json.dumps({"code": str(code), "timeout": float(timeout)}) + "\n")
                self.proc.stdin.flush()
                ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 70)
                line = self.proc.stdout.readline() if ready else ""
                if not line:
                    raise RuntimeError("no answer")
                return Result(**json.loads(line))
            except (RuntimeError, BrokenPipeError, json.JSONDecodeError, OSError):
                self.close()  # a fresh server next time
                return Result(ok=False, stdout="", error="sandbox failure")

    @property
    def layers(self):
        """Which walls came up on this machine ({wall: bool}), as the server's probe child reported them."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            return dict(self._layers)

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
    if sys.argv[1:2] == ["--serve"]:
        _serve(json.loads(sys.argv[2]))
    else:
        r = run_python(sys.stdin.read() if len(sys.argv) < 2 else sys.argv[1])
        print(r.stdout, end="")
        if r.error:
            print(f"[error] {r.error}", file=sys.stderr)
