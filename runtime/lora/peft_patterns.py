"""PEFT's `alpha_pattern` keys, matched as PEFT matches them but in bounded time.

For a module `name`, PEFT (`peft.utils.other.get_pattern_key`) takes the first key for which
`re.match(rf"(.*\\.)?({key})$", name)` succeeds: a key is a regular expression for the module's
path or for a dotted suffix of it. The keys come from a LoRA file's metadata, so they are
untrusted, and Python's backtracking `re` takes exponential time on keys such as
`(.*.*.*.*.*.*.*.*.*.*.*.*)*X`. Here a key is

- refused when longer than MAX_PATTERN_CHARS or when `re` cannot compile it (PEFT fails too);
- a module path (letters, digits, `_`, `-`, `.`; optionally `^` before and `$` after), as
  nearly every key in the wild is (diffusers writes module names there): matched by `re`
  itself, as PEFT does. With no quantifier in the key, the one of PEFT's `(.*\\.)?` is the
  only one, and a match costs O(len(name) · len(key));
- otherwise parsed as a subset of `re`'s syntax (literal characters, `.`, classes `[…]`,
  `\\d \\w \\s \\D \\W \\S`, escaped punctuation, groups `(…)` and `(?:…)`, `|`, `*`, `+`,
  `?`, `{m}`, `{m,}`, `{,n}` and `{m,n}` greedy or lazy, `^`, `$`) and matched by running its
  automaton (Thompson's construction) over the name, which takes O(len(name) · states)
  whatever the key. Anything else (backreferences, lookarounds, inline flags, possessive
  quantifiers, other escapes) is refused.

Refusals are ValueErrors naming the key; `re`'s own semantics (Unicode `\\w`, `.` without
newline, `$` before a final newline) are kept, and tests check the automaton against `re`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

MAX_PATTERN_CHARS = 256
MAX_REPEAT = 100  # the largest m, n of {m,n}
MAX_STATES = 2048  # automaton size, {m,n} copies included
_MAX_CACHED_STEPS = 4096  # remembered (state set, character) transitions per key
_MODULE_PATH = re.compile(r"\^?[A-Za-z0-9_.\-]+\$?")
_PEFT_TEMPLATE = r"(.*\.)?({})$"

Predicate = Callable[[str], bool]
_CLASS_ESCAPES: dict[str, Predicate] = {
    "d": str.isdecimal,
    "D": lambda c: not c.isdecimal(),
    "w": lambda c: c.isalnum() or c == "_",
    "W": lambda c: not (c.isalnum() or c == "_"),
    "s": str.isspace,
    "S": lambda c: not c.isspace(),
}
_SPECIAL = set(".^$*+?{}[]\\|()")

# Syntax tree: ("char", predicate) | ("cat", [nodes]) | ("alt", [nodes])
#              | ("rep", node, low, high or None) | ("bol",) | ("eol",)
Node = tuple


class PatternKeyMatcher:
    """Whether a module name matches one key, as PEFT's `get_pattern_key` decides it."""

    def __init__(self, key: str, where: str):
        if not isinstance(key, str):
            raise ValueError(f"{where}: pattern keys must be strings, got {key!r:.80}")
        if len(key) > MAX_PATTERN_CHARS:
            raise ValueError(
                f"{where}: pattern key {key[:60]!r}… is {len(key)} characters, more than "
                f"{MAX_PATTERN_CHARS} allowed"
            )
        wrapped = _PEFT_TEMPLATE.format(key)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # FutureWarning on `[[` and the like
                compiled = re.compile(wrapped)
        except (re.error, RecursionError, OverflowError) as e:
            reason = e.msg if isinstance(e, re.error) else type(e).__name__
            raise ValueError(
                f"{where}: pattern key {key!r} is not a regular expression ({reason})"
            ) from e
        self.key = key
        self._regex: re.Pattern[str] | None = None
        self._automaton: _Automaton | None = None
        if _MODULE_PATH.fullmatch(key):
            self._regex = compiled
        else:
            try:
                tree = _Parser(key).parse()
                self._automaton = _Automaton(_peft_wrapper(tree))
            except _Unsupported as e:
                raise ValueError(
                    f"{where}: pattern key {key!r} uses {e}, which fewstep does not match "
                    "(module paths, and regular expressions with . [] \\d \\w \\s () (?:) | * + "
                    "? {m,n} ^ $)"
                ) from None

    def matches(self, name: str) -> bool:
        if self._regex is not None:
            return self._regex.match(name) is not None
        assert self._automaton is not None
        return self._automaton.matches(name)


# --- parsing ---------------------------------------------------------------------------


class _Unsupported(Exception):
    """A construct outside the subset; the message says which."""


def _literal(ch: str) -> Node:
    return ("char", lambda c: c == ch)


def _peft_wrapper(key: Node) -> Node:
    """`(.*\\.)?(key)$`."""
    any_but_newline: Node = ("char", lambda c: c != "\n")
    prefix: Node = ("cat", [("rep", any_but_newline, 0, None), _literal(".")])
    return ("cat", [("rep", prefix, 0, 1), key, ("eol",)])


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.i = 0

    def peek(self, ahead: int = 0) -> str:
        j = self.i + ahead
        return self.text[j] if j < len(self.text) else ""

    def take(self) -> str:
        ch = self.peek()
        self.i += 1
        return ch

    def parse(self) -> Node:
        node = self.alternation()
        if self.i != len(self.text):
            raise _Unsupported(f"{self.peek()!r} at position {self.i}")
        return node

    def alternation(self) -> Node:
        branches = [self.concatenation()]
        while self.peek() == "|":
            self.take()
            branches.append(self.concatenation())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def concatenation(self) -> Node:
        items = []
        while self.peek() not in ("", "|", ")"):
            items.append(self.repetition())
        return ("cat", items)

    def repetition(self) -> Node:
        atom = self.atom()
        bounds = self.quantifier()
        if bounds is None:
            return atom
        if atom[0] in ("bol", "eol"):
            raise _Unsupported("a quantifier on an anchor")
        if self.peek() == "?":
            self.take()  # lazy: the same set of matches
        if self.peek() and self.peek() in "*+?{":
            raise _Unsupported(f"{self.peek()!r} after a quantifier (possessive or repeated)")
        return ("rep", atom, *bounds)

    def quantifier(self) -> tuple[int, int | None] | None:
        ch = self.peek()
        if ch in ("*", "+", "?"):
            self.take()
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
        if ch != "{":
            return None
        match = re.compile(r"\{(\d*)(,?)(\d*)\}").match(self.text, self.i)
        if match is None or not (match[1] or match[3]):
            raise _Unsupported(f"'{{' at position {self.i} (a literal brace)")
        self.i = match.end()
        low = int(match[1] or 0)
        high = low if not match[2] else (int(match[3]) if match[3] else None)
        if max(low, high or 0) > MAX_REPEAT:
            raise _Unsupported(f"a repeat count over {MAX_REPEAT}")
        return low, high

    def atom(self) -> Node:
        ch = self.take()
        if ch == "(":
            if self.peek() == "?":
                if self.peek(1) != ":":
                    raise _Unsupported(f"'(?{self.peek(1)}' (lookarounds, flags, named groups)")
                self.i += 2
            inner = self.alternation()
            if self.take() != ")":
                raise _Unsupported("an unclosed group")
            return inner
        if ch == "[":
            return ("char", self.char_class())
        if ch == ".":
            return ("char", lambda c: c != "\n")
        if ch == "^":
            return ("bol",)
        if ch == "$":
            return ("eol",)
        if ch == "\\":
            escaped = self.escape()
            return ("char", escaped) if callable(escaped) else _literal(escaped)
        if ch in _SPECIAL - {"]", "}"}:
            raise _Unsupported(f"{ch!r} at position {self.i - 1}")
        return _literal(ch)

    def escape(self) -> str | Predicate:
        """After a backslash: a class predicate (\\d …) or the literal character."""
        ch = self.take()
        if ch in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[ch]
        if not ch or (ch.isascii() and ch.isalnum()):
            raise _Unsupported(f"the escape '\\{ch}'")
        return ch

    def char_class(self) -> Predicate:
        negate = self.peek() == "^"
        if negate:
            self.take()
        chars: set[str] = set()
        ranges: list[tuple[str, str]] = []
        classes: list[Predicate] = []
        first = True
        while True:
            ch = self.take()
            if not ch:
                raise _Unsupported("an unclosed class")
            if ch == "]" and not first:
                break
            first = False
            item = self.escape() if ch == "\\" else ch
            if callable(item):
                classes.append(item)
                continue
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.take()
                end = self.take()
                end_item = self.escape() if end == "\\" else end
                if callable(end_item):
                    raise _Unsupported("a range ending in a class escape")
                ranges.append((item, end_item))
            else:
                chars.add(item)

        def member(c: str) -> bool:
            inside = (
                c in chars
                or any(lo <= c <= hi for lo, hi in ranges)
                or any(test(c) for test in classes)
            )
            return inside != negate

        return member


# --- matching ----------------------------------------------------------------------------

_CHAR, _SPLIT, _BOL, _EOL, _MATCH = range(5)


def _never(c: str) -> bool:
    return False


class _Automaton:
    """Thompson's NFA of a syntax tree, simulated one character at a time."""

    def __init__(self, tree: Node):
        self.kind: list[int] = []
        self.test: list[Predicate] = []
        self.out1: list[int] = []
        self.out2: list[int] = []
        self.final = self._state(_MATCH)
        self.start = self._build(tree, self.final)
        self._steps: dict[tuple[frozenset[int], str], frozenset[int]] = {}

    def _state(self, kind: int, test: Predicate = _never, out1: int = -1, out2: int = -1) -> int:
        if len(self.kind) >= MAX_STATES:
            raise _Unsupported(f"more than {MAX_STATES} automaton states (repeats)")
        self.kind.append(kind)
        self.test.append(test)
        self.out1.append(out1)
        self.out2.append(out2)
        return len(self.kind) - 1

    def _build(self, node: Node, after: int) -> int:
        """The first state of `node`'s automaton, which continues at `after`."""
        kind = node[0]
        if kind == "char":
            return self._state(_CHAR, node[1], after)
        if kind == "bol":
            return self._state(_BOL, out1=after)
        if kind == "eol":
            return self._state(_EOL, out1=after)
        if kind == "cat":
            for item in reversed(node[1]):
                after = self._build(item, after)
            return after
        if kind == "alt":
            start = self._build(node[1][-1], after)
            for branch in reversed(node[1][:-1]):
                start = self._state(_SPLIT, out1=self._build(branch, after), out2=start)
            return start
        _, body, low, high = node  # "rep"
        if high is None:
            loop = self._state(_SPLIT, out2=after)
            self.out1[loop] = self._build(body, loop)
            tail = loop
        else:
            tail = after
            for _ in range(high - low):
                tail = self._state(_SPLIT, out1=self._build(body, tail), out2=after)
        for _ in range(low):
            tail = self._build(body, tail)
        return tail

    def _closure(self, states: list[int], at_start: bool, at_end: bool) -> frozenset[int]:
        """The character-reading and final states reachable without reading."""
        seen: set[int] = set()
        out: set[int] = set()
        stack = list(states)
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            kind = self.kind[s]
            if kind == _SPLIT:
                stack += (self.out1[s], self.out2[s])
            elif kind == _BOL:
                if at_start:
                    stack.append(self.out1[s])
            elif kind == _EOL:
                if at_end:
                    stack.append(self.out1[s])
            else:
                out.add(s)
        return frozenset(out)

    def _read(self, current: frozenset[int], ch: str) -> list[int]:
        return [self.out1[s] for s in current if self.kind[s] == _CHAR and self.test[s](ch)]

    def matches(self, name: str) -> bool:
        """`re.match` semantics: from the start, `$` at the end or before a final newline."""
        n = len(name)
        ends = {n, n - 1} if name.endswith("\n") else {n}
        current = self._closure([self.start], True, 0 in ends)
        final = self.final
        for i, ch in enumerate(name):
            if final in current:
                return True
            if not current:
                return False
            if i + 1 in ends:
                current = self._closure(self._read(current, ch), False, True)
                continue
            key = (current, ch)
            following = self._steps.get(key)
            if following is None:
                following = self._closure(self._read(current, ch), False, False)
                if len(self._steps) < _MAX_CACHED_STEPS:
                    self._steps[key] = following
            current = following
        return final in current
