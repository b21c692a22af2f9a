"""Plant one small bug at a time in a module and see whether the tests catch it (mutation testing).

    python tests/plant_bugs.py latex.py -- tests/test_reward.py -k "not hostile and not sigterm"
    python tests/plant_bugs.py reward.py --lines 80-200,523-580 -- tests/test_reward.py
    python tests/plant_bugs.py reward.py --lines 54-75 --on-disk -- tests/test_reward.py -k timer

Each mutant changes one thing: a comparison (< and <=, == and !=, in and not in, is and is not), and for or, a
dropped not, + for - (and * for //), an integer plus one, an if's test negated, a statement deleted. By default it
runs in one process: the mutant's code is swapped into the loaded module's functions and methods, which keep their
identity (a test that imported them sees the bug), and pytest runs again, about a second a mutant where a fresh
process costs five (the module's top level runs again each time: its constants are the mutant's). Tests that
launch the scripts as processes read the file on disk, unchanged: --on-disk writes each mutant to the file and
runs pytest in a process (the file is restored after). Use it too for code torch.compile traces (one process keeps
the graph of an earlier mutant) and where a mutant may allocate without bound (nothing stops it in one process: a
width multiplied by 4,096 ended a run for memory). Prints each survivor's line as the mutant has it: a bug no
test catches, or a change that means the same (an error that ends as None either way, a constant's boundary).
"""

import argparse
import ast
import collections
import contextlib
import importlib
import io
import os
import subprocess
import sys
import time
import types

COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
           ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
ARITHMETIC = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult}
MESSAGES = ("print", "print0", "log", "SystemExit", "ValueError", "DataError")  # their text is not behaviour
DELETABLE = (ast.Assign, ast.AugAssign, ast.Expr, ast.Return, ast.If, ast.For, ast.Raise)
BODIES = (ast.FunctionDef, ast.If, ast.For, ast.While, ast.With, ast.Try)


def _in_message(node, parents):
    while (node := parents.get(node)) is not None:
        if isinstance(node, (ast.JoinedStr, ast.Raise)) or isinstance(node, ast.Call) and \
                getattr(node.func, "id", getattr(node.func, "attr", "")) in MESSAGES:
            return True
    return False


def _changed(node, parents):
    """(what, the node rewritten) for each one-token change of an expression node."""
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in COMPARE:
        op = COMPARE[type(node.ops[0])]
        yield f"{type(node.ops[0]).__name__}->{op.__name__}", ast.Compare(node.left, [op()], node.comparators)
    elif isinstance(node, ast.BoolOp):
        yield "and<->or", ast.BoolOp(ast.Or() if isinstance(node.op, ast.And) else ast.And(), node.values)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "drop not", node.operand
    elif isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
        op = ARITHMETIC[type(node.op)]
        yield f"{type(node.op).__name__}->{op.__name__}", ast.BinOp(node.left, op(), node.right)
    elif isinstance(node, ast.Constant) and type(node.value) is int and \
            not isinstance(parents.get(node), ast.Subscript):
        yield f"{node.value}->{node.value + 1}", ast.Constant(node.value + 1)
    elif isinstance(node, ast.If) and not isinstance(node.test, ast.Constant):
        yield "negate if", ast.UnaryOp(ast.Not(), node.test)


def mutants(src):
    """[(line, what, mutated source)] for src, in line order; each mutated source compiles."""
    tree = ast.parse(src)
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    lines = src.splitlines(keepends=True)
    offset = [0]
    for line in lines:
        offset.append(offset[-1] + len(line))

    def at(line, col):  # ast columns count UTF-8 bytes
        return offset[line - 1] + len(lines[line - 1].encode()[:col].decode())

    out = []
    for node in ast.walk(tree):
        if not hasattr(node, "lineno") or _in_message(node, parents):
            continue
        for what, new in _changed(node, parents):
            target = node.test if isinstance(node, ast.If) else node
            a, b = at(target.lineno, target.col_offset), at(target.end_lineno, target.end_col_offset)
            out.append((node.lineno, what, src[:a] + "(" + ast.unparse(new) + ")" + src[b:]))
        parent = parents.get(node)
        if isinstance(node, DELETABLE) and isinstance(parent, BODIES) and \
                not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            body = [s for f in ("body", "orelse", "finalbody") for s in getattr(parent, f, None) or []]
            if len(body) > 1 or isinstance(node, (ast.If, ast.For)):
                a, b = offset[node.lineno - 1], offset[node.end_lineno] - 1
                out.append((node.lineno, "delete " + type(node).__name__,
                            src[:a] + lines[node.lineno - 1][:node.col_offset] + "pass" + src[b:]))
    compiles = []
    for m in sorted(out, key=lambda m: m[:2]):
        with contextlib.suppress(SyntaxError):
            compile(m[2], "<mutant>", "exec")
            compiles.append(m)
    return compiles


def _definitions(module):
    """The module's own functions and classes by name, and every function and method by qualified name."""
    own = {k: v for k, v in vars(module).items()
           if isinstance(v, (type, types.FunctionType)) and getattr(v, "__module__", None) == module.__name__}
    functions = {}
    for k, v in own.items():
        if isinstance(v, types.FunctionType):
            functions[k] = v
        else:
            for m, f in vars(v).items():  # methods; a staticmethod's, classmethod's or property's function
                f = getattr(f, "__func__", getattr(f, "fget", f))
                if isinstance(f, types.FunctionType):
                    functions[f"{k}.{m}"] = f
    for k, f in list(functions.items()):  # a decorated function (@contextmanager): the code is the wrapped one's
        inner = getattr(f, "__wrapped__", None)
        if isinstance(inner, types.FunctionType):
            functions[k + ".__wrapped__"] = inner
    return own, functions


class NotSwapped(Exception):
    """A mutant whose code cannot replace its function's: the closures differ. It is not run (--on-disk runs it)."""


class InProcess:
    """Runs the tests on a mutant by swapping its code into the module that is already loaded."""

    def __init__(self, path, pytest_args, timeout):
        import pytest
        sys.path.insert(0, os.getcwd())
        # collected first, the tests' conftest sets the environment before the module loads (TRITON_INTERPRET is
        # read when the kernels the module imports are defined)
        with contextlib.redirect_stdout(io.StringIO()):
            pytest.main(["-p", "no:cacheprovider", "-n", "0", "--collect-only", "-q", *pytest_args])
        self.module = importlib.import_module(path[:-3].replace("/", "."))
        self.own, self.functions = _definitions(self.module)
        self.saved = {q: (f.__code__, f.__defaults__, f.__kwdefaults__) for q, f in self.functions.items()}
        self.args = ["--timeout", str(timeout), *pytest_args]

    def _install(self, src, codes=None):
        """Run src's top level in the module (its constants and regexes), then give the original functions the
        code in `codes` (by qualified name; default: src's own), and put the original objects back in place."""
        exec(compile(src, self.module.__file__, "exec"), vars(self.module))
        if codes is None:
            _, rebuilt = _definitions(self.module)
            rebuilt = {q: g for q, g in rebuilt.items() if q in self.functions}
            if any(g.__code__.co_freevars != self.functions[q].__code__.co_freevars for q, g in rebuilt.items()):
                raise NotSwapped  # a function's closure is not the original's (super() deleted from a method)
            codes = {q: (g.__code__, g.__defaults__, g.__kwdefaults__) for q, g in rebuilt.items()}
        for q, code in codes.items():
            f = self.functions[q]
            f.__code__, f.__defaults__, f.__kwdefaults__ = code
        vars(self.module).update(self.own)

    def __call__(self, src, original):
        import pytest
        try:
            self._install(src)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                return pytest.main(["-p", "no:cacheprovider", "-n", "0", "-x", "-q", *self.args])
        except NotSwapped:
            return NotSwapped
        except Exception as e:  # noqa: BLE001 (a mutant whose module's top level fails: no test could import it)
            return f"the module fails to load: {type(e).__name__}"
        finally:
            self._install(original, self.saved)


class OnDisk:
    """Runs the tests on a mutant written to the file, in a fresh process."""

    def __init__(self, path, pytest_args, timeout):
        self.path, self.args, self.timeout = path, ["--timeout", str(timeout), *pytest_args], timeout

    def __call__(self, src, original):
        try:
            with open(self.path, "w") as f:
                f.write(src)
            cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", "-x", "-q", *self.args]
            return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=2 * self.timeout + 60).returncode
        except subprocess.TimeoutExpired:
            return "timeout"  # a loop that never ends is caught
        finally:
            with open(self.path, "w") as f:
                f.write(original)


def main():
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage="%(prog)s FILE [options] -- PYTEST ARGS")
    ap.add_argument("file", help="a module of the project, relative to its root (the working directory)")
    ap.add_argument("--lines", default="", help="only mutants on these lines: a-b,c-d")
    ap.add_argument("--on-disk", action="store_true", help="write each mutant to the file; a fresh process each")
    ap.add_argument("--timeout", type=int, default=60, help="seconds a test may take (a mutant that loops: caught)")
    args = ap.parse_args(argv[:split])
    with open(args.file) as f:
        original = f.read()
    found = mutants(original)
    if args.lines:
        spans = [tuple(map(int, s.split("-"))) for s in args.lines.split(",")]
        found = [m for m in found if any(lo <= m[0] <= hi for lo, hi in spans)]
    run = (OnDisk if args.on_disk else InProcess)(args.file, argv[split + 1:], args.timeout)
    if run(original, original) != 0:
        sys.exit(f"error: the tests fail on {args.file} as it is: fix them first")
    t0, counts = time.time(), collections.Counter()
    for i, (line, what, src) in enumerate(found, 1):
        result = run(src, original)
        outcome = "not run" if result is NotSwapped else "survived" if result == 0 else None  # else: caught
        if outcome:
            counts[outcome] += 1
            print(f"\r{outcome} {args.file}:{line} {what}: {src.splitlines()[line - 1].strip()[:100]}", flush=True)
        print(f"\r{i}/{len(found)} mutants, {counts['survived']} survived, {time.time() - t0:.0f} s", end="",
              file=sys.stderr)
    not_run = f"; {counts['not run']} not run in-process (a closure changed: --on-disk runs them)"
    print(f"\n{counts['survived']} of {len(found)} mutants of {args.file} survived" +
          (not_run if counts["not run"] else ""), flush=True)


if __name__ == "__main__":
    main()
