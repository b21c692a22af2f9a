"""sandbox.py: ordinary code works; each escape an attacker would try fails, checked on the host afterwards."""
import os
import socket
import threading
import time

import pytest

from reward import run_python  # the public name
from sandbox import Sandbox


@pytest.fixture(scope="module")
def box():
    os.environ["SANDBOX_TEST_SECRET"] = "hunter2"  # in the parent's environment before the server starts
    b = Sandbox()
    yield b
    b.close()


def test_ordinary_code_works(box):
    r = box.run("import sympy, numpy as np\nfrom fractions import Fraction\n"
                "print(sympy.factor('x**2 - 1'), np.arange(4).sum(), Fraction(1, 3) + Fraction(1, 6))")
    assert r.ok and r.stdout == "(x - 1)*(x + 1) 6 1/2\n" and r.error is None
    r = box.run("x = 1 / 0")
    assert not r.ok and r.error == "ZeroDivisionError: division by zero"
    assert box.run("import sys; print('bye'); sys.exit(0)").ok
    r = box.run("open('scratch.txt', 'w').write('ok'); print(open('scratch.txt').read())")  # its own directory
    assert r.ok and r.stdout == "ok\n"
    assert run_python("print(2 ** 10)").stdout == "1024\n"


def test_cannot_write_delete_or_rename_outside_its_directory(box, tmp_path):
    os.chmod(tmp_path, 0o777)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.chmod(victim, 0o666)
    target = tmp_path / "new.txt"
    for code in [f"open({str(target)!r}, 'w').write('x')", f"import os; os.remove({str(victim)!r})",
                 f"import os; os.rename({str(victim)!r}, {str(target)!r})",
                 f"import shutil; shutil.rmtree({str(tmp_path)!r})", f"import pathlib; pathlib.Path({str(target)!r}).touch()"]:
        r = box.run(code)
        assert not r.ok and "PermissionError" in r.error, code
    assert victim.read_text() == "keep me" and not target.exists()


def test_cannot_read_files_outside_python_such_as_the_gold_answers(box, tmp_path):
    answers = tmp_path / "test.jsonl"
    answers.write_text('{"answer": "42"}')
    os.chmod(tmp_path, 0o755)
    os.chmod(answers, 0o644)
    r = box.run(f"print(open({str(answers)!r}).read())")
    assert not r.ok and "42" not in r.stdout


def test_cannot_open_network_connections(box):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    got = []
    threading.Thread(target=lambda: got.append(_accept(server)), daemon=True).start()
    for code in [f"import socket; socket.create_connection(('127.0.0.1', {port}))",
                 f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/')",
                 f"import http.client; http.client.HTTPConnection('127.0.0.1', {port}).request('GET', '/')"]:
        assert not box.run(code).ok, code
    time.sleep(3.5)
    assert got == [None]  # nothing ever connected
    server.close()


def _accept(server):
    try:
        return server.accept()
    except OSError:
        return None


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


def test_fork_storm_is_stopped(box):
    r = box.run("import os\nwhile True:\n    os.fork()", timeout=3)
    assert not r.ok and r.seconds < 3
    assert box.run("print('still here')").stdout == "still here\n"


def test_cannot_read_the_parents_environment(box):
    r = box.run("import os\nprint(dict(os.environ))\nprint(open(f'/proc/{os.getppid()}/environ').read())")
    assert "hunter2" not in r.stdout and "SANDBOX_TEST_SECRET" not in r.stdout
    r = box.run("print(open('/proc/1/environ').read())")
    assert "hunter2" not in r.stdout


def test_cannot_signal_or_kill_the_parent(box):
    for code in ["import os; os.kill(os.getppid(), 9)", "import os; os.killpg(os.getpgid(os.getppid()), 9)",
                 f"import os; os.kill({os.getpid()}, 9)", "import signal, os; signal.pthread_kill(1, 9)"]:
        assert not box.run(code).ok
    assert box.run("print(1)").stdout == "1\n"  # the server is alive, and so is this process


def test_memory_cpu_disk_and_output_are_bounded(box):
    r = box.run("x = bytearray(50 * 2**30)")
    assert not r.ok and "MemoryError" in r.error
    t0 = time.time()
    r = box.run("while True: pass", timeout=1.5)
    assert r.error == "timeout" and time.time() - t0 < 4
    r = box.run("open('big.bin', 'wb').write(b'0' * (100 * 2**20))")
    assert not r.ok and "File too large" in r.error
    r = box.run("while True: print('x' * 1000)", timeout=5)
    assert r.error == "output limit exceeded" and len(r.stdout) <= 64 * 1024
    assert box.run("print('fine')").stdout == "fine\n"


def test_layers_report(box):
    layers = box.layers
    assert layers["audit_hook"] and layers["rlimits"]
    assert set(layers) == {"audit_hook", "rlimits", "private_network", "dropped_to_nobody"}
