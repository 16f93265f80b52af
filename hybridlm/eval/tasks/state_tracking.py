"""State tracking (paper Table 5b, App. D; tasks of Grazzi et al. 2025 / Deletang et al. 2023).

    parity             0 1 1 0 1 =  1                parity of the number of ones
    arith              3 + 4 * 2 - 1 =  0            modulo 5, usual precedence, no brackets
    arith-brackets     ( 3 - ( 4 + - 2 ) ) * 1 = 1   modulo 5, brackets and unary minus
    arith-sum          3 + 4 - 2 - 1 =  4            arith with + and - only: a signed sum mod 5
    arith-brackets-sum ( 3 - ( 4 + - 2 ) ) - 1 = 0   arith-brackets with + and - only

The arithmetic tasks take an ``operators`` option (``arith:operators=+-``; default ``+-*``, the ``-sum``
variants ``+-``): which binary operators the expressions draw. Why both exist: Deletang et al.'s
generator draws ``+ - *``, Grazzi et al.'s bracket generator only ``+ -`` unless asked for ``*``, and the
Mamba-3 paper does not say which its runs used (docs/results.md §1). A signed sum mod 5 is a rotation by
2π/5 a unit, as parity is by π; a product by 0 is not invertible.

``length`` counts input symbols (before ``=``); every symbol is its own token. The answer after
``=`` is the scored item. :class:`LengthCurriculum` is the paper's training schedule: lengths
drawn uniformly from [3, max] with max growing 40 -> 160, 10^4 steps per stage; evaluation at 256.
Accuracy is also reported scaled, (acc - chance) / (1 - chance), as the paper does.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from hybridlm.eval.tasks.base import Example, Task, TaskError, require

MODULUS = 5
DIGITS = tuple(str(d) for d in range(MODULUS))
OPERATORS = ("+", "-", "*")


class SymbolTask(Task):
    """Sequences of one-token symbols followed by ``=`` and a one-symbol answer."""

    length_unit = "symbols"
    answers: tuple[str, ...] = ()

    def check_options(self) -> None:
        symbols = self.symbols()
        ids = self.single_tokens(symbols, "input")
        require(len(ids) == len(symbols), self.name,
                f"tokenizer {self.tokenizer.name!r} does not encode each of {''.join(symbols)} as one token")
        self.token = dict(zip(symbols, ids))

    def symbols(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.answers, *OPERATORS, "(", ")", "=")))

    def chance(self) -> float:
        return 1.0 / len(self.answers)

    def problem(self, length: int, rng: random.Random) -> tuple[list[str], str]:
        raise NotImplementedError

    def example(self, length: int, rng: random.Random, index: int, count: int) -> Example:
        require(length >= 1, self.name, f"length {length} must be at least 1")
        symbols, answer = self.problem(length, rng)
        ids = [self.token[s] for s in (*symbols, "=", answer)]
        return Example(ids, [(len(ids) - 1, len(ids))], {"answer": answer, "symbols": len(symbols)})


class Parity(SymbolTask):
    name = "parity"
    answers = ("0", "1")

    def problem(self, length, rng):
        bits = [rng.choice("01") for _ in range(length)]
        return bits, str(bits.count("1") % 2)


class ArithmeticTask(SymbolTask):
    """Expressions mod 5 over the ``operators`` option's binary operators (every one of ``+ - *`` stays in
    the vocabulary, so the variants share one)."""

    answers = DIGITS
    OPTIONS = {"operators": (str, "".join(OPERATORS))}

    def check_options(self) -> None:
        super().check_options()
        ops = self.opt["operators"]
        require(bool(ops) and set(ops) <= set(OPERATORS) and len(set(ops)) == len(ops), self.name,
                f"operators={ops!r}: give one or more of {''.join(OPERATORS)}, each once")
        self.operators = tuple(ops)


class ModularArithmetic(ArithmeticTask):
    name = "arith"

    def problem(self, length, rng):
        # digit (op digit)*: odd lengths; an even length starts with a unary minus.
        symbols = ["-"] if length % 2 == 0 else []
        symbols.append(rng.choice(DIGITS))
        while len(symbols) < length:
            symbols += [rng.choice(self.operators), rng.choice(DIGITS)]
        return symbols, str(evaluate_mod(symbols))


class ModularArithmeticBrackets(ArithmeticTask):
    name = "arith-brackets"

    def problem(self, length, rng):
        symbols = random_expression(length, rng, self.operators)
        return symbols, str(evaluate_mod(symbols))


class ModularSum(ModularArithmetic):
    name = "arith-sum"
    OPTIONS = {"operators": (str, "+-")}


class ModularSumBrackets(ModularArithmeticBrackets):
    name = "arith-brackets-sum"
    OPTIONS = {"operators": (str, "+-")}


def random_expression(length: int, rng: random.Random, operators: tuple[str, ...] = OPERATORS) -> list[str]:
    """A random well-formed expression of exactly ``length`` symbols (iterative: no recursion limit)."""
    out: list[str] = []
    todo: list[int | str] = [length]  # a stack of sub-lengths to expand and literal symbols
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        n = item
        if n == 1:
            out.append(rng.choice(DIGITS))
        elif n == 2:
            out += ["-", rng.choice(DIGITS)]
        else:
            form = rng.random()
            if form < 0.25:
                todo += [")", n - 2, "("]
            elif form < 0.35:
                todo += [n - 1, "-"]
            else:
                left = rng.randint(1, n - 2)
                todo += [n - 1 - left, rng.choice(operators), left]
    return out


def evaluate_mod(symbols: list[str], modulus: int = MODULUS) -> int:
    """Value of an expression modulo ``modulus``: + - * with usual precedence, unary minus, brackets."""
    pos = 0

    def peek() -> str | None:
        return symbols[pos] if pos < len(symbols) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return symbols[pos - 1]

    def atom() -> int:
        s = take()
        if s == "-":
            return -atom() % modulus
        if s == "(":
            value = expr()
            if take() != ")":
                raise TaskError(f"unbalanced brackets in {''.join(symbols)}")
            return value
        return int(s) % modulus

    def term() -> int:
        value = atom()
        while peek() == "*":
            take()
            value = value * atom() % modulus
        return value

    def expr() -> int:
        value = term()
        while peek() in ("+", "-"):
            value = (value + term()) % modulus if take() == "+" else (value - term()) % modulus
        return value

    result = expr()
    if pos != len(symbols):
        raise TaskError(f"trailing symbols in {''.join(symbols)}")
    return result


@dataclass(frozen=True)
class LengthCurriculum:
    """Max length grows over stages (paper App. D: min 3, max 40 -> 160, 10^4 steps per stage)."""

    min_length: int = 3
    first_max: int = 40
    last_max: int = 160
    stages: int = 4
    steps_per_stage: int = 10_000

    def max_length(self, step: int) -> int:
        stage = min(step // self.steps_per_stage, self.stages - 1)
        if self.stages == 1:
            return self.last_max
        return round(self.first_max + (self.last_max - self.first_max) * stage / (self.stages - 1))

    def sample_length(self, step: int, rng: random.Random) -> int:
        return rng.randint(self.min_length, self.max_length(step))

    @property
    def total_steps(self) -> int:
        return self.stages * self.steps_per_stage
