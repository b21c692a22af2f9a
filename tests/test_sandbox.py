"""sandbox.py: ordinary code works; each escape an attacker would try fails, checked on the host afterwards.
Each kernel wall is also tested alone, with the audit hook switched off, so that no test passes on the hook alone."""
import errno
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from reward import run_python  # the public name
from sandbox import Sandbox

ROOT = os.getuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the drop to nobody and the private mounts exist only as root")


def kernel_allows(flag):
    """Whether a fresh process of this user may unshare(flag): the host's answer, asked apart from the sandbox,
    so that a wall the host allows but the sandbox failed to raise fails a test instead of skipping it."""
    code = f"import ctypes, sys; sys.exit(ctypes.CDLL(None, use_errno=True).unshare({flag}) != 0)"
    return subprocess.run([sys.executable, "-c", code]).returncode == 0


NETNS = kernel_allows(0x40000000)  # CLONE_NEWNET
MOUNTNS = ROOT and kernel_allows(0x00020000)  # CLONE_NEWNS (the sandbox mounts only as root)


@pytest.fixture(scope="module")
def box():
    b = Sandbox()
    yield b
    b.close()


@pytest.fixture(scope="module")
def bare():
    """The kernel's walls alone: no audit hook."""
    b = Sandbox(disable=("audit_hook",))
    yield b
    b.close()


def test_ordinary_code_works(box):
    r = box.run("import sympy, numpy as np\nfrom fractions import Fraction\n"
                "print(sympy.factor('x**2 - 1'), np.arange(4).sum(), Fraction(1, 3) + Fraction(1, 6))")
    assert r.ok and r.stdout == "(x - 1)*(x + 1) 6 1/2\n" and r.error is None
    r = box.run("x = 1 / 0")
    assert not r.ok and r.error == "ZeroDivisionError: division by zero"
    assert box.run("import sys; print('bye'); sys.exit(0)").ok
    r = box.run("import sys; print('half'); sys.exit('no solution')")  # as Python: the message on stderr, status 1
    assert not r.ok and r.stdout == "half\n" and r.error == "no solution"
    assert box.run("import sys; sys.exit(3)").error == "exit status 3"
    r = box.run("open('scratch.txt', 'w').write('ok'); print(open('scratch.txt').read())")  # its own directory
    assert r.ok and r.stdout == "ok\n"
    assert run_python("print(2 ** 10)").stdout == "1024\n"


SYMPY_PROGRAMS = [  # each imports modules at call time that `import sympy` did not load
    ("from sympy import symbols, solve\nx = symbols('x')\nprint(solve(x**2 - 4, x))", "[-2, 2]"),
    ("from sympy import symbols, simplify, sin, cos\nx = symbols('x')\nprint(simplify(sin(x)**2 + cos(x)**2))", "1"),
    ("from sympy import symbols, integrate, exp, oo\nx = symbols('x')\nprint(integrate(exp(-x), (x, 0, oo)))", "1"),
    ("from sympy import Matrix\nprint(Matrix([[1, 2], [3, 4]]).inv())", "Matrix([[-2, 1], [3/2, -1/2]])"),
    ("from sympy import Rational, nsimplify\nprint(Rational(3, 4) + nsimplify(0.125))", "7/8"),
    ("from sympy import symbols, series, sin\nx = symbols('x')\nprint(series(sin(x), x, 0, 4))",
     "x - x**3/6 + O(x**4)"),
    ("from sympy import factorint\nprint(factorint(360))", "{2: 3, 3: 2, 5: 1}"),
    ("import numpy as np\nprint(round(float(np.linalg.solve([[2, 1], [1, 3]], [3, 5]).sum()), 6))", "2.2"),
    ("import csv, io, textwrap, unicodedata\nprint(unicodedata.name('π'))", "GREEK SMALL LETTER PI"),
]


@pytest.mark.parametrize("code,want", SYMPY_PROGRAMS)
def test_sympy_and_numpy_programs_work_wherever_python_is_installed(box, code, want):
    r = box.run(code, timeout=30)
    assert r.ok and r.stdout.strip() == want, r.error


def _closed_site(tmp_path):
    """A site directory behind a directory only root may enter: a virtual environment under /root."""
    site = tmp_path / "venv" / "site-packages"
    (site / "lazypkg").mkdir(parents=True)
    (site / "lazypkg" / "__init__.py").write_text(
        "def answer():\n    from lazypkg import deep\n    return deep.VALUE\n")
    (site / "lazypkg" / "deep.py").write_text("VALUE = 42\n")
    for d in (tmp_path / "venv", site, site / "lazypkg"):
        os.chmod(d, 0o755)
    os.chmod(tmp_path, 0o700)
    return site


@needs_root
def test_lazy_imports_from_behind_a_directory_nobody_may_enter(tmp_path):
    b = Sandbox(paths=[_closed_site(tmp_path)])
    try:
        r = b.run("import lazypkg, os\nprint(lazypkg.answer(), os.getuid())")
        assert r.ok and r.stdout == "42 65534\n", r.error
        assert b.layers["private_mounts"]
    finally:
        b.close()


@needs_root
def test_without_a_mount_namespace_the_server_says_so_and_imports_sympy_whole(tmp_path, capfd):
    b = Sandbox(paths=[_closed_site(tmp_path)], disable=("private_mounts",))
    try:
        assert not b.layers["private_mounts"]
        assert "the sandbox's uid cannot read" in capfd.readouterr().err  # the one line, naming the fix
        r = b.run(SYMPY_PROGRAMS[0][0])
        assert r.ok and r.stdout.strip() == SYMPY_PROGRAMS[0][1], r.error
        r = b.run("import lazypkg")  # not imported up front, and out of reach
        assert not r.ok and "lazypkg" in r.error
    finally:
        b.close()


def test_cannot_write_delete_or_rename_outside_its_directory(box, tmp_path):
    os.chmod(tmp_path, 0o777)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.chmod(victim, 0o666)
    target = tmp_path / "new.txt"
    for code in [f"open({str(target)!r}, 'w').write('x')", f"import os; os.remove({str(victim)!r})",
                 f"import os; os.rename({str(victim)!r}, {str(target)!r})",
                 f"import shutil; shutil.rmtree({str(tmp_path)!r})",
                 f"import pathlib; pathlib.Path({str(target)!r}).touch()",
                 "import os; os.open(os.__file__, os.O_RDWR)", "import os; open(os.__file__, 'r+')",  # read-only
                 "import os; open(os.getcwd() + '-sibling', 'w')"]:  # its directory's name, longer: not inside it
        r = box.run(code)  # the hook's own refusal, before the kernel's (nobody may not write there either)
        assert not r.ok and "PermissionError: sandbox:" in r.error, (code, r.error)
    assert victim.read_text() == "keep me" and not target.exists()


@pytest.fixture
def gold(tmp_path_factory):
    """Gold answers where any user may read them: only the sandbox's own walls keep the code out."""
    d = tmp_path_factory.mktemp("answers")
    for p in [d, *d.parents][:-1]:
        if p.stat().st_uid == os.getuid():
            os.chmod(p, p.stat().st_mode | 0o005)
    (d / "test.jsonl").write_text('{"answer": "42"}')
    os.chmod(d / "test.jsonl", 0o644)
    return d


def test_cannot_find_or_read_the_gold_answers(box, gold):
    for code in [f"print(open({str(gold / 'test.jsonl')!r}).read())", f"import os; print(os.listdir({str(gold)!r}))",
                 f"import os; print([e.name for e in os.scandir({str(gold)!r})])",
                 f"import os; print([f for _, _, f in os.walk({str(gold.parent)!r})])",
                 f"import pathlib; print(list(pathlib.Path({str(gold)!r}).iterdir()))"]:
        r = box.run(code)
        assert "42" not in r.stdout and "test.jsonl" not in r.stdout, code
    r = box.run(f"import glob; print(glob.glob({str(gold)!r} + '/*'))")
    assert "test.jsonl" not in r.stdout


def test_cannot_load_native_code_it_wrote(box, bare):
    """A copy of a real extension module, written into the sandbox's directory and loaded from there."""
    code = ("import sys, importlib.util\n"  # an extension module the server has not loaded, copied
            "name = next(n for n in ('_lzma', '_bz2', '_dbm', 'audioop', '_curses', '_tkinter')\n"
            "            if n not in sys.modules and importlib.util.find_spec(n))\n"
            "open('evil.so', 'wb').write(open(importlib.util.find_spec(name).origin, 'rb').read())\n"
            "importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, 'evil.so'))\n"
            "print('LOADED')")
    r = box.run(code)
    assert not r.ok and "no native code" in r.error and "LOADED" not in r.stdout
    if ROOT:  # the kernel's own wall: the directory is mounted no-exec
        r = bare.run(code)
        assert not r.ok and "LOADED" not in r.stdout and "failed to map" in r.error, r.error


def test_cannot_open_network_connections(box, bare):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    got, stop = [], threading.Event()
    t = threading.Thread(target=_accept_until, args=(server, got, stop), daemon=True)
    t.start()
    codes = [f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)",
             f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
             f"import http.client; http.client.HTTPConnection('127.0.0.1', {port}, timeout=2).request('GET', '/')"]
    for code in codes:
        assert not box.run(code).ok, code
    if NETNS:  # the namespace alone: loopback is down, nothing is routable
        r = bare.run(codes[0])
        assert not r.ok and "unreachable" in r.error, r.error
    stop.set()
    t.join()
    assert got == []  # nothing ever connected
    server.close()


def _accept_until(server, got, stop):
    while not stop.is_set():
        try:
            got.append(server.accept())
        except OSError:
            pass


@pytest.mark.parametrize("code", [
    "import os; os.system('touch {m}')",
    "import subprocess; subprocess.run(['touch', '{m}'])",
    "import os; os.execv('/usr/bin/touch', ['touch', '{m}'])",
    "import os; os.posix_spawn('/usr/bin/touch', ['touch', '{m}'], {{}})",
    "import ctypes; ctypes.CDLL(None).system(b'touch {m}')",
    "import os\nif os.fork() == 0: open('{m}', 'w')",
    "import pty; pty.spawn(['touch', '{m}'])",
])
def test_cannot_start_programs(box, tmp_path, code):
    os.chmod(tmp_path, 0o777)
    marker = tmp_path / "marker"
    r = box.run(code.format(m=marker))
    assert not r.ok
    time.sleep(0.2)
    assert not marker.exists()


def test_open_files_are_limited(bare):
    """RLIMIT_NOFILE 64: the 60th file the code opens fails with EMFILE (stdin, stdout, stderr and the
    interpreter's own take the first few)."""
    code = "fs = []\ntry:\n    while True:\n        fs.append(open(f'f{len(fs)}', 'w'))\nexcept OSError as e:\n" \
           "    print(len(fs), e.errno)"
    count, errno_ = map(int, bare.run(code).stdout.split())
    assert count < 64 and errno_ == errno.EMFILE


def test_fork_is_refused_by_the_process_limit_alone(bare, tmp_path):
    r = bare.run("import os\nwhile True:\n    os.fork()", timeout=30)
    assert not r.ok and r.error.startswith("BlockingIOError"), r.error  # EAGAIN at the first fork
    assert bare.run("print('still here')").stdout == "still here\n"


def test_cannot_read_another_process_environment(box, bare):
    """The secret lives in a separate process's environment; the sandbox tries to read it through /proc."""
    helper = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                              env={"SANDBOX_TEST_SECRET": "hunter2"}, stdout=subprocess.PIPE, text=True)
    try:
        assert helper.stdout.readline() == "up\n"
        code = f"print(open('/proc/{helper.pid}/environ').read())"
        assert open(f"/proc/{helper.pid}/environ").read().count("hunter2") == 1  # it is there to be read
        r = box.run(code)
        assert not r.ok and "hunter2" not in r.stdout
        r = box.run("import os\nprint(dict(os.environ))")
        assert r.ok and "hunter2" not in r.stdout and "SANDBOX_TEST_SECRET" not in r.stdout
        assert box.run("import os\nprint(sorted(os.environ))").stdout == "['HOME', 'PATH', 'TMPDIR']\n"  # no other
        if ROOT:  # as nobody, the kernel refuses another user's /proc/PID/environ
            r = bare.run(code)
            assert not r.ok and "PermissionError" in r.error and "hunter2" not in r.stdout
    finally:
        helper.kill()
        helper.wait()


def test_cannot_signal_or_kill_the_parent(box, bare):
    codes = ["import os; os.kill(os.getppid(), 9)", "import os; os.killpg(os.getpgid(os.getppid()), 9)",
             f"import os; os.kill({os.getpid()}, 9)", "import signal, os; signal.pthread_kill(1, 9)"]
    for code in codes:
        assert not box.run(code).ok
    if ROOT:  # nobody may not signal root's processes
        for code in codes[:3]:
            r = bare.run(code)
            assert not r.ok and "PermissionError" in r.error, (code, r.error)
    assert box.run("print(1)").stdout == "1\n"  # the server is alive, and so is this process


def test_memory_cpu_disk_and_output_are_bounded(box, bare):
    r = bare.run("x = bytearray(50 * 2**30)")
    assert not r.ok and "MemoryError" in r.error
    r = box.run("while True: pass", timeout=1.5)  # the server's deadline, not the CPU limit (signal 24) behind it
    assert r.error == "timeout" and r.seconds < 30  # a bound against a hang, not a timing: CI machines are loaded
    r = bare.run("open('big.bin', 'wb').write(b'0' * (100 * 2**20))")
    assert not r.ok and "File too large" in r.error
    r = box.run("for i in range(65): open(f'f{i}', 'w').close()")  # files by count, beside their bytes
    assert not r.ok and r.error == "PermissionError: sandbox: too many files written", r.error
    r = box.run("while True: print('x' * 1000)", timeout=30)
    assert r.error == "output limit exceeded" and len(r.stdout) <= 64 * 1024
    assert box.run("print('fine')").stdout == "fine\n"


def test_the_cpu_limit_alone_ends_a_loop():
    b = Sandbox(disable=("audit_hook", "deadline"))
    try:
        r = b.run("while True: pass", timeout=1)
        assert not r.ok and r.error == "killed by signal 24", r.error  # SIGXCPU at 2 CPU seconds
        assert r.seconds < 20  # 2 CPU seconds; a bound loose enough for a loaded machine
    finally:
        b.close()


def test_layers_report(box):
    """The walls that must come up on this host: all of them as root (the network and mount namespaces where
    the kernel allows them), the rlimits and the hook otherwise."""
    layers = box.layers
    assert set(layers) == {"audit_hook", "rlimits", "private_network", "dropped_to_nobody", "private_mounts"}
    assert layers["audit_hook"] and layers["rlimits"]
    assert layers["dropped_to_nobody"] == ROOT
    assert layers["private_network"] == NETNS and layers["private_mounts"] == MOUNTNS
