"""A small LaTeX-to-sympy parser for the subset that math answers use, safe on hostile input (reward.py).

It builds sympy objects directly: nothing is ever passed to eval or sympify (which calls eval). Inputs are capped
in length, nesting depth and digits, and powers in size, so 10^{10^{10}} is refused, not computed. What it reads:
numbers, + - * / ^ and implicit products (2x, 2\\pi, x(y+1)), \\frac, \\sqrt[n]{}, |x|, n!, \\cdot, \\times, \\div,
the usual functions (\\sin, \\ln, ...), \\pi, \\infty, e, i, Greek and subscripted names (x_1, a_{ij}), and
\\sum / \\prod with limits, left unevaluated so that equal sums compare equal.

    to_sympy("\\frac{2}{4}") == to_sympy("1/2")     # True; to_sympy("__import__('os')") is None
"""

import re

import sympy

MAX_CHARS = 400  # characters of an expression
MAX_DEPTH = 40  # parser nesting
MAX_DIGITS = 60  # digits of one number literal

TOKEN = re.compile(r"\s*(\d+\.\d*|\.\d+|\d+|\\[a-zA-Z]+|[a-zA-Z]|\*\*|[-+*/^(){}\[\],!|_=])")
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
            if name in ("sum", "prod"):  # \sum_{k=0}^{n} term: unevaluated, so that equal sums compare equal
                self.take("_")
                self.take("{")
                var = self.subscripted(self.take())
                self.take("=")
                lo = self.expr()
                self.take("}")
                self.take("^")
                hi = self.atom_or_group()
                return (sympy.Sum if name == "sum" else sympy.Product)(self.term(), (var, lo, hi))
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
            if len(name) > 1:  # Greek letters and other named symbols (a command is letters: TOKEN)
                return self.subscripted(name)
            raise ParseError(f"unknown command \\{name}")
        if t.isalpha():
            self.take()
            if t == "i":
                return sympy.I
            if t == "e":
                return sympy.E
            return self.subscripted(t)
        raise ParseError(f"unexpected {t!r}")

    def subscripted(self, name):
        """A symbol, with its subscript if one follows: x_1, x_{n+1}, a_{ij}."""
        if self.peek() == "_":
            self.take()
            name += "_" + str(self.atom_or_group())
        return sympy.Symbol(name)

    def atom_or_group(self):
        return self.group() if self.peek() == "{" else self.power()


def to_sympy(s):
    """A sympy expression for a LaTeX answer, or None if it is not in the parsed subset."""
    if len(s) > MAX_CHARS:
        return None
    try:
        return Parser(s).parse()
    except (ParseError, TypeError, ValueError, ZeroDivisionError, RecursionError, AttributeError):
        return None
