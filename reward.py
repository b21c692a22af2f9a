"""Judging answers: extraction, equivalence, and the reward GRPO optimises (paper §4, §6; ../shared/PAPER.md §5-6).

A grader that is wrong or exploitable teaches the model the wrong thing, so every input is treated as hostile:
answers are length-capped, never passed to eval or sympify (a small LaTeX parser of our own builds sympy objects
directly, with caps on nesting, digits and exponents), and every sympy call runs under a timer.

    extract_answer(text) -> str | None       the final answer of a solution
    is_equiv(pred, gold) -> bool             the same mathematical answer?
    math_reward(completion, gold) -> float   1.0 if right, else 0.0
    batch_rewards(completions, golds)        the same over worker processes, with a per-item timeout
    run_python(code, timeout)                model-written code in the sandbox (sandbox.py)

Conventions where graders disagree (ours): a tuple is ordered and a set (\\{...\\}) is not; an interval's
brackets matter; "x = 3" equals "3"; 50% equals 50 and 0.5; units and \\text{} around a number are ignored;
a bare letter A-E equals "(A)"; numbers agree within a relative 1e-6 or an absolute 1e-9 (no rounding leeway:
"3.14" is not pi).

    python reward.py "The answer is \\boxed{\\frac{1}{2}}" "0.5"       # extract and compare from the shell
"""

import math
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from fractions import Fraction

import sympy

from sandbox import run_python  # noqa: F401  public here: reward.run_python runs model-written code

MAX_TEXT = 20_000  # characters of a completion looked at (its end: that is where answers are)
MAX_ANSWER = 400  # characters of an extracted answer
MAX_DEPTH = 40  # parser nesting
MAX_DIGITS = 60  # digits of one number literal
SYMPY_SECONDS = 2.0  # per sympy comparison

# -----------------------------------------------------------------------------
# Timeouts


@contextmanager
def time_limit(seconds):
    """Raise TimeoutError after `seconds` of wall time (an interval timer: main thread of a process only; in
    other threads the block runs unbounded, so graders run in worker processes for hard limits)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):
        raise TimeoutError(f"over {seconds}s")
    outer, _ = signal.getitimer(signal.ITIMER_REAL)  # nested limits: the inner one never extends the outer
    old = signal.signal(signal.SIGALRM, fire)
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer) if outer else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


# -----------------------------------------------------------------------------
# Extraction


def _braced(text, start):
    """The content of the {...} group opening at text[start], braces matched, or None."""
    depth = 0
    for k in range(start, len(text)):
        if text[k] == "{" and (k == 0 or text[k - 1] != "\\"):
            depth += 1
        elif text[k] == "}" and text[k - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1:k]
    return None


def last_boxed(text):
    """The last \\boxed{...} / \\fbox{...} content (nested braces), or `\\boxed 5`; None if there is none."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*(\{)?", text):
        if m.group(1):
            content = _braced(text, m.start(1))
        else:
            tail = re.match(r"\s*([^\s$]+)", text[m.end():])
            content = tail.group(1) if tail else None
        if content is not None:
            best = content
    return best


def extract_answer(text):
    """The final answer of a solution, in the order of the DeepSeekMath evaluation code: Minerva's "final answer
    is $...$", the last \\boxed{}, the text after "The answer is", GSM8K's "#### 42", the last ```output block.
    None when there is none (no last-number fallback: it rewards a guess that happens to end a text)."""
    if not text:
        return None
    text = text[-MAX_TEXT:]
    found = None
    m = list(re.finditer(r"final answer is \$(.+?)\$(?:\.|\s|$)", text, re.S))
    if m:
        found = m[-1].group(1)
    if found is None:
        found = last_boxed(text)
    if found is None:
        m = list(re.finditer(r"[Tt]he answer is[:\s]*(.+?)(?:\.\s|\.$|\n|$)", text))
        if m:
            found = m[-1].group(1)
    if found is None:
        m = list(re.finditer(r"####\s*(.+?)\s*$", text, re.M))
        if m:
            found = m[-1].group(1)
    if found is None:
        m = list(re.finditer(r"```output\n(.*?)```", text, re.S))
        if m:
            found = m[-1].group(1).strip().splitlines()[-1] if m[-1].group(1).strip() else None
    if found is None:
        return None
    found = found.strip().strip("$").strip()
    return found[:MAX_ANSWER] if found else None


# -----------------------------------------------------------------------------
# Normalisation: one spelling per answer

UNITS = (r"(?:square\s+)?(?:cm|m|km|mm|in|inch(?:es)?|ft|feet|foot|yards?|miles?|meters?|centimeters?|units?|"
         r"degrees?|hours?|minutes?|seconds?|days?|weeks?|years?|dollars?|cents?|pounds?|kg|g|grams?|liters?|"
         r"mph|sq|students?|people|apples|marbles|coins|books|cookies|points?)")


def normalize(s):
    """Strip what does not change an answer: $, \\left/\\right, spacing commands, \\displaystyle, \\text around
    units, a trailing period, degree signs, dfrac/tfrac, thousands separators, and "x =" in front."""
    s = s.strip()
    s = re.sub(r"\\(?:left|right|displaystyle|!|,|;|:|quad|qquad)", "", s)
    s = s.replace("\\ ", " ").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:dfrac|tfrac)", r"\\frac", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree", "", s)
    s = re.sub(r"\\(?:mbox|mathrm|textbf|textit|mathbf)\s*\{", r"\\text{", s)
    s = re.sub(r"\\text\s*\{\s*" + UNITS + r"(?:\^?\d)?\s*\}(?:\^\{?\d\}?)?", "", s)  # \text{ cm}, \text{ m}^2
    s = re.sub(r"(?<=\d)\s+" + UNITS + r"(?:\^?\d)?\b", "", s)  # 5 cm
    s = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"(\d),(?=\d{3}(?!\d))", r"\1", s) if re.fullmatch(r"[\d,.\s]+", s) else s  # 1,234,567
    s = s.replace("{,}", "")
    s = re.sub(r"^[a-zA-Z]\s*=(?!=)\s*", "", s)  # x = 3 -> 3
    s = s.rstrip(".").strip()
    s = re.sub(r"\s+", " ", s)
    return s


def _number(s):
    """A plain number (int, decimal, a/b, \\frac{a}{b}, mixed number, percent, scientific) as a Fraction, or None."""
    s = s.replace(" ", "").replace("\\%", "%").lstrip("+")
    if len(s) > MAX_DIGITS + 10:
        return None
    pct = s.endswith("%")
    s = s.rstrip("%")
    neg = s.startswith("-")
    s = s.lstrip("-")
    m = re.fullmatch(r"(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)  # mixed number 2\frac{1}{2}
    try:
        if m:
            v = int(m.group(1)) + Fraction(int(m.group(2)), int(m.group(3)))
        elif (m := re.fullmatch(r"\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)):
            v = Fraction(m.group(1)) / Fraction(m.group(2))
        elif (m := re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)/(\d+(?:\.\d*)?)", s)):
            v = Fraction(m.group(1)) / Fraction(m.group(2))
        elif (m := re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(?:(?:e|\\times10\^|\\cdot10\^|\*10\^)\{?(-?\d{1,3})\}?)?", s)):
            v = Fraction(m.group(1)) * Fraction(10) ** int(m.group(2) or 0)
        else:
            return None
    except (ValueError, ZeroDivisionError):
        return None
    v = -v if neg else v
    return v / 100 if pct else v


def _close(a, b):
    """Equal within a relative 1e-6 (absolute 1e-9 near zero); never for overflowed or NaN values."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    return abs(a - b) <= max(1e-9, 1e-6 * max(abs(a), abs(b)))


# -----------------------------------------------------------------------------
# A small LaTeX -> sympy parser (the subset that answers use). It builds sympy objects directly: nothing is ever
# evaluated as Python. Numbers are capped in digits and powers in size, so 10^{10^{10}} is refused, not computed.

TOKEN = re.compile(r"\s*(\d+\.\d*|\.\d+|\d+|\\[a-zA-Z]+|[a-zA-Z]|\*\*|[-+*/^(){}\[\],!|])")
FUNCS = {"sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "sec": sympy.sec, "csc": sympy.csc, "cot": sympy.cot,
         "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "ln": sympy.log, "log": sympy.log,
         "exp": sympy.exp, "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh}
CONSTS = {"pi": sympy.pi, "infty": sympy.oo, "e": sympy.E}


class ParseError(ValueError):
    pass


class Parser:
    def __init__(self, s):
        s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/")
        pos, self.toks = 0, []
        while pos < len(s):
            m = TOKEN.match(s, pos)
            if not m:
                if s[pos:].strip() == "":
                    break
                raise ParseError(f"unexpected {s[pos:pos + 10]!r}")
            self.toks.append(m.group(1))
            pos = m.end()
        self.i, self.depth = 0, 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, want=None):
        t = self.peek()
        if t is None or (want is not None and t != want):
            raise ParseError(f"expected {want!r}, got {t!r}")
        self.i += 1
        return t

    def parse(self):
        e = self.expr()
        if self.peek() is not None:
            raise ParseError(f"trailing {self.peek()!r}")
        return e

    def expr(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError("nested too deeply")
        e = self.term()
        while self.peek() in ("+", "-"):
            e = e + self.term() if self.take() == "+" else e - self.term()
        self.depth -= 1
        return e

    def term(self):
        e = self.unary()
        while True:
            t = self.peek()
            if t in ("*", "/"):
                self.take()
                rhs = self.unary()
                e = e * rhs if t == "*" else e / rhs
            elif t is not None and t not in ("+", "-", ")", "}", "]", ",", "|", "^", "!"):
                e = e * self.unary()  # implicit multiplication: 2x, 2\pi, x(y+1)
            else:
                return e

    def unary(self):
        if self.peek() == "-":
            self.take()
            return -self.unary()
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self):
        base = self.atom()
        while self.peek() == "!":
            self.take()
            if not (base.is_Integer and 0 <= base <= 100):
                raise ParseError("factorial of a large or non-integer value")
            base = sympy.factorial(base)
        if self.peek() in ("^", "**"):
            self.take()
            exp = self.unary() if self.peek() != "{" else self.group()
            if exp.is_Number and base.is_Number and (abs(exp) > 300 or (abs(base) > 10**6 and abs(exp) > 20)):
                raise ParseError("power too large to compute")
            if not exp.is_Number and exp.has(sympy.Pow) and any(a.is_Number and abs(a) > 300 for a in exp.atoms()):
                raise ParseError("power tower")
            return sympy.Pow(base, exp)
        return base

    def group(self, open_="{", close="}"):
        self.take(open_)
        e = self.expr()
        self.take(close)
        return e

    def atom(self):
        t = self.peek()
        if t is None:
            raise ParseError("unexpected end")
        if t[0].isdigit() or t[0] == ".":
            self.take()
            if len(t) > MAX_DIGITS:
                raise ParseError("number too long")
            return sympy.Rational(t) if "." in t else sympy.Integer(t)
        if t in ("(", "["):
            return self.group(t, ")" if t == "(" else "]")
        if t == "{":
            return self.group()
        if t == "|":
            self.take()
            e = self.expr()
            self.take("|")
            return sympy.Abs(e)
        if t.startswith("\\"):
            self.take()
            name = t[1:]
            if name == "frac":
                return self.group() / self.group()
            if name == "sqrt":
                if self.peek() == "[":
                    n = self.group("[", "]")
                    return sympy.root(self.atom_or_group(), n)
                return sympy.sqrt(self.atom_or_group())
            if name in CONSTS:
                return CONSTS[name]
            if name in FUNCS:
                if self.peek() == "^":  # \sin^2 x
                    self.take()
                    p = self.atom_or_group()
                    return FUNCS[name](self.atom_or_group()) ** p
                return FUNCS[name](self.atom_or_group())
            if len(name) > 1 and name.isalpha():  # Greek letters and other named symbols
                return sympy.Symbol(name)
            raise ParseError(f"unknown command \\{name}")
        if t.isalpha():
            self.take()
            if t == "i":
                return sympy.I
            if t == "e":
                return sympy.E
            return sympy.Symbol(t)
        raise ParseError(f"unexpected {t!r}")

    def atom_or_group(self):
        return self.group() if self.peek() == "{" else self.power()


def to_sympy(s):
    """A sympy expression for a LaTeX answer, or None if it is not in the parsed subset."""
    if len(s) > MAX_ANSWER:
        return None
    try:
        return Parser(s).parse()
    except (ParseError, TypeError, ValueError, ZeroDivisionError, RecursionError, AttributeError):
        return None


def _sympy_equal(a, b):
    try:
        with time_limit(SYMPY_SECONDS):
            d = a - b
            if d == 0:
                return True
            free = sorted(d.free_symbols, key=str)
            checked = 0
            for k in range(8):  # numeric check at a few points first: fast and decisive for most answers
                point = {s: sympy.Rational(13 + 7 * k + 3 * j, 17 + 2 * k) for j, s in enumerate(free)}
                va, vd = complex(a.subs(point).evalf(30)), complex(d.subs(point).evalf(30))
                if not (math.isfinite(abs(va)) and math.isfinite(abs(vd))):
                    continue  # a pole of the expression (e.g. x = 1 in (x^2-1)/(x-1)): try another point
                if abs(vd) > 1e-8 * max(1.0, abs(va)):
                    return False
                checked += 1
            return checked >= 2 and (not free or sympy.simplify(d) == 0)
    except (TimeoutError, TypeError, ValueError, ZeroDivisionError, OverflowError, RecursionError, AttributeError):
        return False


# -----------------------------------------------------------------------------
# Equivalence


def _split_top(s, sep=","):
    """Split on `sep` outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _structure(s):
    """An answer's shape: ("interval", open_l, [a, b], open_r), ("tuple", [..]), ("set", [..]), ("matrix", rows),
    ("pm", a, b) for a ± b, ("eq", lhs, rhs), or ("atom", s)."""
    s = s.strip()
    m = re.fullmatch(r"\\begin\{[pbv]?matrix\}(.*)\\end\{[pbv]?matrix\}", s, re.S)
    if m:
        return ("matrix", [[c.strip() for c in row.split("&")] for row in m.group(1).split("\\\\") if row.strip()])
    if s.startswith("\\{") and s.endswith("\\}"):
        return ("set", [p.strip() for p in _split_top(s[2:-2])])
    if "\\cup" in s:
        return ("union", sorted(p.strip() for p in s.split("\\cup")))
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and len(_split_top(s[1:-1])) >= 2:
        parts = [p.strip() for p in _split_top(s[1:-1])]
        if len(parts) == 2 and (s[0] == "[" or s[-1] == "]" or "\\infty" in s):
            return ("interval", s[0], parts, s[-1])
        return ("tuple", parts, s[0], s[-1])
    if len(_split_top(s)) >= 2:
        return ("set", [p.strip() for p in _split_top(s)])  # "1, 2" lists roots: order does not matter
    if "\\pm" in s:
        a, _, b = s.partition("\\pm")
        return ("pm", a.strip() or "0", b.strip())
    if s.count("=") == 1 and "<" not in s and ">" not in s:
        lhs, rhs = s.split("=")
        return ("eq", lhs.strip(), rhs.strip())
    return ("atom", s)


def _atom_equal(a, b):
    if a == b:
        return True
    al, bl = a.lower().replace(" ", ""), b.lower().replace(" ", "")
    if al == bl:
        return True
    letters = [re.fullmatch(r"\(?([a-e])\)?", x) for x in (al, bl)]  # multiple choice
    if all(letters):
        return letters[0].group(1) == letters[1].group(1)
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        if _close(float(na), float(nb)):
            return True
        # a percentage on one side: 50% vs 50 or 0.5
        if a.rstrip().endswith(("%", "\\%")) != b.rstrip().endswith(("%", "\\%")):
            return _close(float(na) * 100, float(nb)) or _close(float(na), float(nb) * 100)
        return False
    sa, sb = to_sympy(a.replace("%", "").replace("\\", "\\")), to_sympy(b)
    if sa is None or sb is None:
        return False
    if (na is not None or nb is not None) and not (sa.free_symbols or sb.free_symbols):
        # one side a plain number, the other a closed form: compare values, no rounding leeway
        try:
            with time_limit(SYMPY_SECONDS):
                return _close(complex(sa.evalf(30)).real, complex(sb.evalf(30)).real) and \
                    _close(complex(sa.evalf(30)).imag, complex(sb.evalf(30)).imag)
        except (TimeoutError, TypeError, ValueError, OverflowError):
            return False
    return _sympy_equal(sa, sb)


def _equal(a, b, depth=0):
    if depth > 5:
        return False
    a, b = normalize(a), normalize(b)
    if a == b:
        return True
    sa, sb = _structure(a), _structure(b)
    if sa[0] == "pm" and sb[0] in ("set", "tuple") or sb[0] == "pm" and sa[0] in ("set", "tuple"):
        pm, other = (sa, sb) if sa[0] == "pm" else (sb, sa)
        expanded = [f"{pm[1]}+{pm[2]}", f"{pm[1]}-{pm[2]}"]
        return _same_multiset(expanded, other[1], depth)
    if sa[0] == "eq" and sb[0] != "eq":
        return _equal(sa[2], b, depth + 1) if re.fullmatch(r"[a-zA-Z]\w*", sa[1]) else False
    if sb[0] == "eq" and sa[0] != "eq":
        return _equal(a, sb[2], depth + 1) if re.fullmatch(r"[a-zA-Z]\w*", sb[1]) else False
    if sa[0] != sb[0]:
        if {sa[0], sb[0]} == {"tuple", "set"} and sa[0] == "set" and not a.startswith("\\{"):
            return False
        return False
    kind = sa[0]
    if kind == "atom":
        return _atom_equal(a, b)
    if kind == "interval":
        return sa[1] == sb[1] and sa[3] == sb[3] and all(_equal(x, y, depth + 1) for x, y in zip(sa[2], sb[2]))
    if kind == "tuple":
        return len(sa[1]) == len(sb[1]) and all(_equal(x, y, depth + 1) for x, y in zip(sa[1], sb[1]))
    if kind in ("set", "union"):
        return _same_multiset(sa[1], sb[1], depth)
    if kind == "matrix":
        return len(sa[1]) == len(sb[1]) and all(len(r) == len(q) and all(_equal(x, y, depth + 1) for x, y in zip(r, q))
                                                for r, q in zip(sa[1], sb[1]))
    if kind == "pm":
        return _equal(sa[1], sb[1], depth + 1) and _equal(sa[2], sb[2], depth + 1)
    if kind == "eq":  # two equations: same sides, or the same relation up to a constant factor
        if _equal(sa[1], sb[1], depth + 1) and _equal(sa[2], sb[2], depth + 1):
            return True
        ea, eb = to_sympy(f"({sa[1]})-({sa[2]})"), to_sympy(f"({sb[1]})-({sb[2]})")
        if ea is None or eb is None or eb == 0:
            return False
        try:
            with time_limit(SYMPY_SECONDS):
                ratio = sympy.simplify(ea / eb)
                return ratio.is_number and ratio != 0
        except (TimeoutError, TypeError, ValueError, ZeroDivisionError):
            return False
    return False


def _same_multiset(xs, ys, depth):
    if len(xs) != len(ys):
        return False
    ys = list(ys)
    for x in xs:
        for j, y in enumerate(ys):
            if _equal(x, y, depth + 1):
                del ys[j]
                break
        else:
            return False
    return True


def is_equiv(pred, gold):
    """Whether an extracted answer `pred` is the same answer as `gold`. Never raises; a timeout is False."""
    if pred is None or gold is None:
        return False
    pred, gold = str(pred)[:MAX_ANSWER], str(gold)[:MAX_ANSWER]
    try:
        with time_limit(4 * SYMPY_SECONDS):
            return _equal(pred, gold)
    except (TimeoutError, RecursionError, ValueError, TypeError):
        return False


# -----------------------------------------------------------------------------
# Rewards


def math_reward(completion, gold, format_weight=0.0):
    """1.0 if the completion's final answer equals `gold`, else 0.0. With format_weight w > 0, a completion
    with no extractable answer gets -w (ours: off by default, as the paper's rule reward)."""
    pred = extract_answer(completion)
    if pred is None:
        return -format_weight
    return 1.0 if is_equiv(pred, gold) else 0.0


STEP_LINE = re.compile(r"^[ \t]*(-?\d{1,12})[ \t]*([-+*/])[ \t]*(-?\d{1,12})[ \t]*=[ \t]*(-?\d{1,12})[ \t]*$", re.M)


def process_rewards(completion, gold):
    """Per-step rewards for process supervision (paper §4.1.3), from a rule-based checker standing in for the
    paper's process reward model on the toy's arithmetic: each `a op b = c` line is a step, 1.0 if c is right
    (integer division for /, as the toy's problems), else 0.0; the final answer is the last step, with the
    outcome reward. Returns [(character offset where the step ends, reward)] in order."""
    text = completion[-MAX_TEXT:]
    shift = len(completion) - len(text)
    steps = []
    for m in STEP_LINE.finditer(text):
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        right = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else None}[op]
        steps.append((shift + m.end(), float(right == c)))
    return steps + [(len(completion), math_reward(completion, gold))]


def _reward_item(args):
    completion, gold, format_weight = args
    return math_reward(completion, gold, format_weight)


def batch_rewards(completions, golds, format_weight=0.0, workers=None, pool=None):
    """math_reward over many completions in worker processes (each bounds its own sympy time), in order.
    Pass a multiprocessing pool to reuse one across calls."""
    items = [(c, g, format_weight) for c, g in zip(completions, golds)]
    if pool is not None:
        return pool.map(_reward_item, items, chunksize=max(1, len(items) // 32))
    if workers == 1 or len(items) < 8:
        return [_reward_item(it) for it in items]
    import multiprocessing as mp
    with mp.get_context("fork").Pool(workers) as p:
        return p.map(_reward_item, items, chunksize=max(1, len(items) // 32))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit('usage: python reward.py "<completion>" "<gold answer>"')
    pred = extract_answer(sys.argv[1])
    print(f"extracted: {pred!r}\nequivalent to {sys.argv[2]!r}: {is_equiv(pred, sys.argv[2])}")
