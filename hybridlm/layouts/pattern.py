"""The layer-pattern grammar.

    sequence := item*
    item     := atom ('*' COUNT)*
    atom     := SYMBOL | '(' sequence ')'

Symbols are identifiers separated by whitespace (``M F A``); ``*3`` repeats the preceding symbol
or group. ``"((M F) *3 A F) *2"`` expands to 16 blocks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

MAX_BLOCKS = 100_000
MAX_DEPTH = 64  # nesting of groups; deeper would exhaust Python's recursion limit

_TOKEN = re.compile(r"\s*(?:(?P<sym>[A-Za-z_][A-Za-z0-9_]*)|(?P<num>\d+)|(?P<op>[()*])|(?P<bad>\S))")


class PatternError(ValueError):
    """A malformed pattern; ``column`` is 1-based."""

    def __init__(self, message: str, column: int | None = None):
        self.column = column
        super().__init__(message if column is None else f"{message} (column {column})")


@dataclass(frozen=True)
class _Tok:
    kind: str  # sym | num | ( | ) | * | end
    text: str
    col: int


def _tokenize(pattern: str) -> Iterator[_Tok]:
    """Tokens one at a time: the parser stops at the first error or limit without scanning the rest
    (a 10 MB pattern fails as fast as a short one)."""
    pos = 0
    while pos < len(pattern):
        m = _TOKEN.match(pattern, pos)
        if m is None:  # only trailing whitespace is left
            break
        col = m.start(m.lastgroup) + 1
        kind = m.lastgroup
        text = m.group(kind)
        if kind == "bad":
            raise PatternError(f"unexpected character {text!r}", col)
        yield _Tok(text if kind == "op" else kind, text, col)
        pos = m.end()
    yield _Tok("end", "", len(pattern) + 1)


class _Parser:
    def __init__(self, pattern: str):
        self.toks = _tokenize(pattern)
        self.next: _Tok = next(self.toks)
        self.depth = 0

    def peek(self) -> _Tok:
        return self.next

    def take(self) -> _Tok:
        tok = self.next
        if tok.kind != "end":
            self.next = next(self.toks)
        return tok

    def sequence(self, closing: _Tok | None) -> list[str]:
        out: list[str] = []
        while self.peek().kind not in ("end", ")"):
            out.extend(self.item())
            if len(out) > MAX_BLOCKS:
                raise PatternError(f"expands to more than {MAX_BLOCKS} blocks")
        if closing is None and self.peek().kind == ")":
            raise PatternError("unbalanced ')': no matching '('", self.peek().col)
        if closing is not None and self.peek().kind == "end":
            raise PatternError("unbalanced '(': no matching ')'", closing.col)
        return out

    def item(self) -> list[str]:
        tok = self.take()
        if tok.kind == "sym":
            seq = [tok.text]
        elif tok.kind == "(":
            if self.depth >= MAX_DEPTH:
                raise PatternError(f"groups nested deeper than {MAX_DEPTH}", tok.col)
            self.depth += 1
            seq = self.sequence(tok)
            self.depth -= 1
            close = self.take()
            if not seq:
                raise PatternError("empty group '()'", tok.col)
            assert close.kind == ")"
        elif tok.kind == "*":
            raise PatternError("'*' must follow a symbol or a group", tok.col)
        else:  # a bare number
            raise PatternError(f"unexpected number {tok.text!r}; write a repeat as '*{tok.text}'", tok.col)
        while self.peek().kind == "*":
            star = self.take()
            num = self.take()
            if num.kind != "num":
                raise PatternError("'*' must be followed by a repeat count", star.col)
            if len(num.text.lstrip("0")) > len(str(MAX_BLOCKS)):  # int() of a huge digit string is slow or refused
                raise PatternError(f"expands to more than {MAX_BLOCKS} blocks", num.col)
            count = int(num.text)
            if count < 1:
                raise PatternError(f"repeat count must be at least 1, got {count}", num.col)
            if len(seq) * count > MAX_BLOCKS:
                raise PatternError(f"expands to more than {MAX_BLOCKS} blocks", num.col)
            seq = seq * count
        return seq


def expand_pattern(pattern: str) -> list[str]:
    """Expand a pattern string into its sequence of block symbols."""
    symbols = _Parser(pattern).sequence(None)
    if not symbols:
        raise PatternError("the pattern names no blocks")
    return symbols


def compress_symbols(symbols: list[str]) -> str:
    """A short pattern for a symbol list (runs of one repeated unit collapse to ``(...) *n``)."""
    out: list[str] = []
    i = 0
    n = len(symbols)
    while i < n:
        best_unit, best_count = 1, 1
        for unit in range(1, (n - i) // 2 + 1):
            count = 1
            while symbols[i + count * unit: i + (count + 1) * unit] == symbols[i: i + unit]:
                count += 1
            if count > 1 and unit * count > best_unit * best_count:
                best_unit, best_count = unit, count
                if unit * count == n - i:  # covers the rest: no longer unit can do better
                    break
        chunk = symbols[i: i + best_unit]
        text = compress_symbols(chunk) if best_count > 1 and best_unit > 1 else " ".join(chunk)
        if best_count > 1:
            text = (f"({text})" if best_unit > 1 else text) + f" *{best_count}"
        out.append(text)
        i += best_unit * best_count
    return " ".join(out)
