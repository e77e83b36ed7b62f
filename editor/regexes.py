"""Regular expressions for structured values: checking a user's `re=` pattern, numeric ranges
(`as=int min=2 max=400`) and JSON Schema string formats, all as Python `re` source text that
`editor.patterns` compiles to an automaton. Pure Python: no torch import.

Every pattern is matched against the whole fill (anchors are implied). The numeric ranges write
no leading zeros, no "-0" and no exponent, and only "." as the decimal point, so every value they
allow is also a JSON number.
"""

from __future__ import annotations

import functools
import re
import re._parser as sre_parse  # type: ignore[import-not-found]  # the parser `re` itself uses (3.11+)
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import interegular

if TYPE_CHECKING:
    from editor.document import MaskSpan

__all__ = [
    "FORMATS",
    "PatternError",
    "checked_pattern",
    "compile_fsm",
    "json_string_content",
    "number_pattern",
    "searched_pattern",
    "span_patterns",
]


class PatternError(ValueError):
    """A pattern that cannot be used: bad syntax, or a feature no automaton can express."""


# `re`'s parser names the constructs we meet by opcode; these have no finite-automaton meaning
# (back-references, lookarounds, conditionals) or a different one (possessive/atomic groups).
_UNSUPPORTED = {
    "GROUPREF": "back-references (\\1, (?P=name))",
    "GROUPREF_EXISTS": "conditional groups ((?(1)a|b))",
    "ASSERT": "lookahead/lookbehind ((?=...), (?<=...))",
    "ASSERT_NOT": "negative lookahead/lookbehind ((?!...), (?<!...))",
    "ATOMIC_GROUP": "atomic groups ((?>...))",
    "POSSESSIVE_REPEAT": "possessive quantifiers (a*+, a++)",
}
_EDGE_ANCHORS = {"AT_BEGINNING", "AT_BEGINNING_STRING", "AT_END", "AT_END_STRING"}


def searched_pattern(source: str, filler: str) -> str:
    """A JSON Schema `pattern` (found anywhere in the string unless anchored with ^ or $) as a
    whole-string pattern: any run of `filler` characters stands in for an unanchored side."""
    body = checked_pattern(source)
    items = list(sre_parse.parse(source))
    opened = bool(items) and str(items[0][0]) == "AT"
    closed = len(items) > int(opened) and str(items[-1][0]) == "AT"
    return ("" if opened else f"{filler}*") + f"(?:{body})" + ("" if closed else f"{filler}*")


def checked_pattern(source: str) -> str:
    """`source` ready for the automaton compiler: valid Python `re` syntax, no feature an automaton
    cannot express, and edge anchors (`^...$`, `\\A...\\Z`) dropped since the whole fill matches
    anyway. Raises PatternError naming what is wrong."""
    try:
        parsed = re.compile(source)
    except re.error as error:
        raise PatternError(f"invalid regular expression: {error}") from error
    if parsed.flags & ~(re.UNICODE | re.IGNORECASE):
        raise PatternError("flags other than (?i) are not supported in a pattern")

    tree = sre_parse.parse(source)
    items = list(tree)
    start, end = 0, len(items)
    if items and str(items[0][0]) == "AT" and str(items[0][1]) in ("AT_BEGINNING", "AT_BEGINNING_STRING"):
        start = 1
    if end > start and str(items[-1][0]) == "AT" and str(items[-1][1]) in ("AT_END", "AT_END_STRING"):
        end -= 1
    for op, value in items[start:end]:
        _refuse_unsupported(op, value)
    body = source
    if start:
        body = body[2:] if body.startswith("\\A") else body[1:]
    if end < len(items):
        body = body[:-2] if body.endswith("\\Z") else body[:-1]
    compile_fsm(body)  # what `re` accepts but the automaton compiler does not fails here, early
    return body


@functools.lru_cache(maxsize=256)
def compile_fsm(pattern: str) -> interegular.FSM:
    """The character automaton of a checked pattern (cached: a template compiles the same few
    patterns for every record)."""
    try:
        return interegular.parse_pattern(_literal_escapes(pattern)).to_fsm()
    except Exception as error:  # interegular raises its own Unsupported and parse errors
        raise PatternError(f"the pattern cannot be compiled to an automaton: {error}") from error


_CODE_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\(?:u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))")


def _literal_escapes(pattern: str) -> str:
    """`\\uXXXX` and `\\UXXXXXXXX` (which `re` and JSON Schema patterns use, and the automaton
    compiler does not) written as the characters themselves."""

    def character(match: re.Match[str]) -> str:
        code = int(match.group(2) or match.group(3), 16)
        return match.group(1) + re.escape(chr(code))

    return _CODE_ESCAPE.sub(character, pattern)


def span_patterns(span: MaskSpan) -> tuple[str, ...]:
    """The regular expressions a span's fill must all match: its re= patterns, or the range of an
    `as=int|number` span with min=/max=; none for any other span."""
    if span.patterns:
        return tuple(checked_pattern(pattern) for pattern in span.patterns)
    if span.value_class in ("int", "number") and (span.minimum is not None or span.maximum is not None):
        low = None if span.minimum is None else parse_bound(span.minimum)
        high = None if span.maximum is None else parse_bound(span.maximum)
        return (number_pattern(span.value_class == "int", low, high),)
    return ()


def _refuse_unsupported(op: object, value: object) -> None:
    name = str(op)
    if name in _UNSUPPORTED:
        raise PatternError(f"{_UNSUPPORTED[name]} are not supported (a pattern must be a regular language)")
    if name == "AT":
        where = "^, $, \\A and \\Z only at the pattern's edges" if str(value) in _EDGE_ANCHORS else None
        raise PatternError(
            "anchors and word boundaries (\\b, \\B) inside a pattern are not supported"
            + (f" ({where}; the whole fill always matches)" if where else "")
        )
    for part in _children(value):
        op2, value2 = part
        _refuse_unsupported(op2, value2)


def _children(value: object) -> list[tuple[object, object]]:
    """The (op, value) pairs nested in one parsed item's value."""
    found: list[tuple[object, object]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, tuple | list):
            if len(item) == 2 and type(item[0]).__name__ == "_NamedIntConstant":
                found.append((item[0], item[1]))
                continue
            stack.extend(item)
        elif type(item).__name__ == "SubPattern":
            stack.extend(list(item))  # type: ignore[call-overload]
    return found


# --- numeric ranges ---------------------------------------------------------------------------


def number_pattern(
    integer: bool,
    minimum: Decimal | None = None,
    maximum: Decimal | None = None,
    *,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> str:
    """The decimal numbers in a range as a regular expression: no leading zeros, no "-0", "." as
    the point, no exponent; `integer` allows no point at all. Raises PatternError for an empty range."""
    if integer:
        low = None if minimum is None else _int_bound(minimum, up=True, exclusive=exclusive_minimum)
        high = None if maximum is None else _int_bound(maximum, up=False, exclusive=exclusive_maximum)
        if low is not None and high is not None and low > high:
            raise PatternError(f"no integer lies between {minimum} and {maximum}")
        return _join(_integers(low, high))
    if (
        minimum is not None
        and maximum is not None
        and (minimum > maximum or (minimum == maximum and (exclusive_minimum or exclusive_maximum)))
    ):
        raise PatternError(f"no number lies between {minimum} and {maximum}")
    branches: list[str] = []
    # Positive side (0 included): [max(min, 0), max].
    if maximum is None or maximum >= 0:
        if minimum is None or minimum < 0:
            low_bound, low_open = Decimal(0), False
        else:
            low_bound, low_open = minimum, exclusive_minimum
        branches += _decimals(low_bound, low_open, maximum, exclusive_maximum)
    # Negative side, mirrored: "-" then a magnitude in (max(-max, 0), -min], never zero.
    if minimum is None or minimum < 0:
        if maximum is None or maximum >= 0:
            magnitude_low, magnitude_open = Decimal(0), True
        else:
            magnitude_low, magnitude_open = -maximum, exclusive_maximum
        magnitude_high = None if minimum is None else -minimum
        negative = _decimals(magnitude_low, magnitude_open, magnitude_high, exclusive_minimum)
        if negative:
            branches.append("-(?:" + "|".join(negative) + ")")
    if not branches:
        raise PatternError(f"no number lies between {minimum} and {maximum}")
    return _join(branches)


def _int_bound(value: Decimal, *, up: bool, exclusive: bool) -> int:
    whole = int(value.to_integral_value(rounding="ROUND_CEILING" if up else "ROUND_FLOOR"))
    if exclusive and whole == value:
        whole += 1 if up else -1
    return whole


def _join(branches: list[str]) -> str:
    return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"


def _integers(low: int | None, high: int | None) -> list[str]:
    """Branches for the integers in [low, high] (None: unbounded), no leading zeros, no "-0"."""
    branches: list[str] = []
    if high is None or high >= 0:
        branches += _naturals(max(low, 0) if low is not None else 0, high)
    if low is None or low < 0:
        top = None if low is None else -low
        bottom = 1 if high is None or high >= 0 else -high
        if top is None or top >= bottom:
            branches.append("-" + _join(_naturals(bottom, top)))
    return branches


def _naturals(low: int, high: int | None) -> list[str]:
    """Branches for the natural numbers in [low, high] (high None: no upper bound)."""
    branches: list[str] = []
    if low == 0:
        branches.append("0")
        low = 1
        if high == 0:
            return branches
    if high is not None and low > high:
        return branches
    top = high if high is not None else 10 ** len(str(low)) - 1
    for digits in range(len(str(low)), len(str(top)) + 1):
        first = max(low, 10 ** (digits - 1))
        last = min(top, 10**digits - 1)
        if first <= last:
            branches += _same_length(str(first), str(last))
    if high is None:
        branches.append(f"[1-9]\\d{{{len(str(top))},}}")  # every longer number
    return branches


def _same_length(low: str, high: str) -> list[str]:
    """Branches for the digit strings of one length from low to high (inclusive)."""
    if not low:
        return [""]
    if low == high:
        return [low]
    if low[0] == high[0]:
        return [low[0] + _join(_same_length(low[1:], high[1:]))]
    rest = len(low) - 1
    tail = f"\\d{{{rest}}}" if rest else ""
    branches: list[str] = []
    first_full = low[1:] == "0" * rest
    last_full = high[1:] == "9" * rest
    lo_digit = int(low[0]) if first_full else int(low[0]) + 1
    hi_digit = int(high[0]) if last_full else int(high[0]) - 1
    if not first_full:
        branches.append(low[0] + _join(_same_length(low[1:], "9" * rest)))
    if lo_digit <= hi_digit:
        branches.append(_digit_class(lo_digit, hi_digit) + tail)
    if not last_full:
        branches.append(high[0] + _join(_same_length("0" * rest, high[1:])))
    return branches


def _digit_class(low: int, high: int) -> str:
    if low == high:
        return str(low)
    if (low, high) == (0, 9):
        return "\\d"
    return f"[{low}-{high}]"


def _split(value: Decimal) -> tuple[int, str]:
    """A non-negative decimal as (integer part, fraction digits without trailing zeros)."""
    text = format(value, "f")
    whole, _, fraction = text.partition(".")
    return int(whole), fraction.rstrip("0")


def _decimals(low: Decimal, low_open: bool, high: Decimal | None, high_open: bool) -> list[str]:
    """Branches for non-negative decimal strings "I" or "I.F" whose value lies between low and high
    (open or closed ends; high None: unbounded)."""
    if high is not None and (low > high or (low == high and (low_open or high_open))):
        return []
    low_whole, low_fraction = _split(low)
    any_fraction = "(?:\\.\\d+)?"
    if high is None:
        branches = _whole_branch(str(low_whole), (low_fraction, low_open), None)
        return [*branches, _join(_naturals(low_whole + 1, None)) + any_fraction]
    high_whole, high_fraction = _split(high)
    if low_whole == high_whole:
        return _whole_branch(str(low_whole), (low_fraction, low_open), (high_fraction, high_open))
    branches = _whole_branch(str(low_whole), (low_fraction, low_open), None)
    if high_whole - 1 >= low_whole + 1:
        branches.append(_join(_naturals(low_whole + 1, high_whole - 1)) + any_fraction)
    branches += _whole_branch(str(high_whole), ("", False), (high_fraction, high_open))
    return branches


_Bound = tuple[str, bool]  # fraction digits (no trailing zeros; "" is zero) and whether it is open


def _whole_branch(whole: str, lower: _Bound, upper: _Bound | None) -> list[str]:
    """`whole` alone or with a fraction ".F", where lower <(=) .F <(=) upper (None: no bound)."""
    bare = _zero_fits(lower, upper)
    fraction = _fraction(lower, upper, nonempty=True)
    if fraction is None:
        return [whole] if bare else []
    tail = "\\." + fraction
    return [whole + ("(?:" + tail + ")?" if bare else tail)]


def _zero_fits(lower: _Bound, upper: _Bound | None) -> bool:
    """Whether a fraction of zero (nothing after the point) lies within the bounds."""
    above = lower == ("", False)
    below = upper is None or upper[0] != "" or not upper[1]
    return above and below


def _fraction(lower: _Bound, upper: _Bound | None, *, nonempty: bool) -> str | None:
    """Digit strings F (non-empty, or possibly empty) whose value .F is within the bounds; None
    when there is none. Walks the bounds a digit at a time: a first digit above the lower bound's
    frees the rest from it, one equal to it passes the rest of the bound on."""
    if upper is not None and upper[0] == "":  # at most zero: all zeros, and only if zero fits
        if lower == ("", False) and not upper[1]:
            return "0+" if nonempty else "0*"
        return None
    if upper is None and lower[0] == "":
        if lower[1]:
            return "\\d*[1-9]\\d*"  # above zero: some digit is not 0
        return "\\d+" if nonempty else "\\d*"
    groups: dict[str, list[int]] = {}
    for digit in range(10):
        rest = _after_digit(digit, lower, upper)
        if rest is not None:
            groups.setdefault(rest, []).append(digit)
    branches = [_digit_set(digits) + rest for rest, digits in groups.items()]
    body = _join(branches) if branches else None
    if nonempty:
        return body
    if body is None:
        return "" if _zero_fits(lower, upper) else None
    return "(?:" + body + ")?" if _zero_fits(lower, upper) else body


def _after_digit(digit: int, lower: _Bound, upper: _Bound | None) -> str | None:
    """What may follow `digit` as the first fraction digit (regex, possibly ""), or None."""
    low_digits, low_open = lower
    if low_digits:
        first = int(low_digits[0])
        if digit < first:
            return None
        next_lower: _Bound = (low_digits[1:], low_open) if digit == first else ("", False)
    else:
        next_lower = ("", low_open) if digit == 0 else ("", False)
    next_upper: _Bound | None = None
    if upper is not None:
        high_digits, high_open = upper
        first = int(high_digits[0])
        if digit > first:
            return None
        next_upper = (high_digits[1:], high_open) if digit == first else None
    return _fraction(next_lower, next_upper, nonempty=False)


def _digit_set(digits: list[int]) -> str:
    if len(digits) == 1:
        return str(digits[0])
    if digits == list(range(digits[0], digits[-1] + 1)):
        return _digit_class(digits[0], digits[-1])
    return "[" + "".join(str(d) for d in digits) + "]"


def parse_bound(text: str) -> Decimal:
    """A `min=`/`max=` value or a schema bound as an exact decimal; raises PatternError."""
    try:
        value = Decimal(text)
    except InvalidOperation as error:
        raise PatternError(f"{text!r} is not a number") from error
    if not value.is_finite():
        raise PatternError(f"{text!r} is not a finite number")
    return value


# --- JSON Schema strings ----------------------------------------------------------------------

_BYTE = "(?:25[0-5]|2[0-4]\\d|1\\d\\d|[1-9]?\\d)"
_YEAR = "(?:[1-9]\\d{3}|0[1-9]\\d\\d|00[1-9]\\d|000[1-9])"  # no year 0000 (not a calendar year)
_DATE = (
    _YEAR + "-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\\d|30)"
    "|02-(?:0[1-9]|1\\d|2[0-8]))"
)
_TIME = "(?:[01]\\d|2[0-3]):[0-5]\\d:[0-5]\\d(?:\\.\\d{1,6})?(?:Z|[+-](?:[01]\\d|2[0-3]):[0-5]\\d)"
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HEX = "[0-9a-fA-F]"
FORMATS: dict[str, str] = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "email": "[A-Za-z0-9_%+-]+(?:\\.[A-Za-z0-9_%+-]+)*@" + _LABEL + "(?:\\." + _LABEL + ")+",
    "uuid": f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}",
    "ipv4": f"{_BYTE}(?:\\.{_BYTE}){{3}}",
}

# A character that may stand unescaped inside a JSON string (and on a prose line): no quote, no
# backslash, no control character.
JSON_STRING_CHAR = '[^"\\\\\\x00-\\x1f\\x7f]'


def json_string_content(min_chars: int, max_chars: int | None) -> str:
    """Unescaped JSON-string characters, between min_chars and max_chars of them."""
    top = "" if max_chars is None else str(max_chars)
    return f"{JSON_STRING_CHAR}{{{min_chars},{top}}}"


def length_bounds(patterns: tuple[str, ...]) -> tuple[int, int | None] | None:
    """The fewest and most characters a string matching every pattern has (most: None when
    unbounded); None when no string matches them all."""
    fsm = compile_fsm(patterns[0])
    for pattern in patterns[1:]:
        fsm = fsm & compile_fsm(pattern)
    moves = {state: set(targets.values()) for state, targets in fsm.map.items()}
    live = set(fsm.finals)
    changed = True
    while changed:  # states that can still reach an accepting one
        before = len(live)
        live |= {state for state, targets in moves.items() if targets & live}
        changed = len(live) != before
    if fsm.initial not in live:
        return None
    graph = {state: moves.get(state, set()) & live for state in live}
    shortest = {fsm.initial: 0}
    frontier = [fsm.initial]
    while frontier:  # breadth first: the fewest characters to each state
        following = []
        for state in frontier:
            for target in graph[state]:
                if target not in shortest:
                    shortest[target] = shortest[state] + 1
                    following.append(target)
        frontier = following
    fewest = min(shortest[state] for state in fsm.finals if state in shortest)
    return fewest, _longest(fsm.initial, graph, set(fsm.finals))


def _longest(initial: Any, graph: dict[Any, set[Any]], finals: set[Any]) -> int | None:
    """The longest path from `initial` to an accepting state, None when a cycle makes it unbounded."""
    order: list[Any] = []
    state_of: dict[Any, int] = {}  # 1: on the stack, 2: done
    stack: list[tuple[Any, list[Any]]] = [(initial, list(graph[initial]))]
    state_of[initial] = 1
    while stack:
        node, pending = stack[-1]
        if pending:
            target = pending.pop()
            mark = state_of.get(target)
            if mark == 1:
                return None
            if mark is None:
                state_of[target] = 1
                stack.append((target, list(graph[target])))
            continue
        state_of[node] = 2
        order.append(node)
        stack.pop()
    longest: dict[Any, int] = {}
    for node in order:  # children before parents
        tails = [longest[t] + 1 for t in graph[node] if t in longest]
        if node in finals:
            tails.append(0)
        if tails:
            longest[node] = max(tails)
    return longest.get(initial)
