"""Automation rules and schedules: reading rule files, checking them against device models, and evaluating conditions
on readings (no I/O). Shared: the gateway runs them, the relay checks a rule set before it sends it down.

Conditions are rule-engine expressions (`temperature > 30 and not led`), compiled once when a rule is loaded; a rule
with a window also sees `avg_X`, `min_X`, `max_X`, `delta_X` for each numeric resource X and `count`. `Engine` keeps
each (rule, device)'s state: inactive -> pending (condition holds, waiting out `for`) -> firing -> resolved (the clear
condition, or the condition no longer holding), then a cooldown in which the rule does not fire again for that device.
"""

from __future__ import annotations

import decimal
import fnmatch
import functools
import json
import math
import operator
import re
import tomllib
import zoneinfo
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from croniter import croniter

from edgetrio import wire

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
AGGREGATES = ("avg", "min", "max", "delta")
SEVERITIES = ("info", "warning", "critical")
MISSED = ("skip", "run_once")
MAX_WINDOW = 1_000  # readings one (rule, device) window keeps at most, whatever its span (memory: a gateway is small)
MAX_ITEMS = 1_000  # rules and schedules in one document
MAX_CONDITION = 2_000  # characters of one condition
# Every reading is judged by every rule that covers its device, on the loop that also takes readings in: the
# conditions' total size bounds that work (1,000 rules of 2,000 characters took 102 ms a reading)
MAX_CONDITIONS_TOTAL = 50_000  # characters of all of a gateway's rule conditions together (when and clear)
MAX_RULES_TOTAL = 500  # rules on one gateway: 5,000 of the smallest took 42 ms a reading
# readings all of a gateway's windows keep for one device (a time window counted as full): 2,000 rules with a window of
# 1,000 grew a gateway from 90 to 342 MB for one device
MAX_WINDOWS_TOTAL = 20_000
RULE_KEYS = {"name", "devices", "model", "when", "clear", "window", "for", "cooldown", "severity", "notify", "actions",
             "on_clear", "description"}
SCHEDULE_KEYS = {"name", "devices", "cron", "every", "timezone", "missed", "actions", "description"}
ACTION_KEYS = {"set", "command", "export", "args", "device", "timeout", "retries"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_COOLDOWN = 60.0  # seconds a rule stays quiet for a device after it resolved: a flapping sensor cannot storm


def _engine() -> Any:
    import rule_engine  # a third of a second to import: paid when rules are compiled, not by every CLI call

    return rule_engine


class Resource(Protocol):
    @property
    def type(self) -> str: ...  # int | float | bool | string


class Model(Protocol):
    """What a rule is checked against: a device model's name and its resources (the gateway's registry.Model)."""

    @property
    def name(self) -> str: ...

    @property
    def resources(self) -> Mapping[str, Resource]: ...


class RuleError(ValueError):
    """A rule or schedule that cannot be used; the message is one line naming it (and the position, when known)."""


def parse_duration(value: Any, what: str) -> float:
    """Seconds from a number or a text such as 90s, 2m, 1h, 1d."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text and text[-1] in UNITS and re.fullmatch(r"\d+(\.\d+)?", text[:-1]):
            return float(text[:-1]) * UNITS[text[-1]]
    raise RuleError(f"{what}: {json.dumps(value)} is not a duration (use seconds, or 30s, 2m, 1h, 1d)")


def read_rule_file(path: Path) -> dict[str, Any]:
    """The document in a rule file (TOML, or JSON when it ends in .json), with its `rule` and `schedule` lists."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError(f"{path}: cannot read it: {exc.strerror if isinstance(exc, OSError) else exc}") from exc
    try:  # bounded like everything else read (a file nested thousands deep is an error, not a crash)
        doc = wire.loads(text) if path.suffix == ".json" else wire.loads_toml(text)
    except json.JSONDecodeError as exc:
        raise RuleError(f"{path}: not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"{path}: not TOML: {exc}") from exc
    except ValueError as exc:  # too deep or too big
        raise RuleError(f"{path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise RuleError(f"{path}: expected an object with 'rule' and 'schedule' lists")
    unknown = set(doc) - {"rule", "schedule"}
    if unknown:
        raise RuleError(f"{path}: unknown section {sorted(unknown)[0]!r} (expected [[rule]] and [[schedule]])")
    for key in ("rule", "schedule"):
        items = doc.get(key, [])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise RuleError(f"{path}: {key!r} must be a list of tables ([[{key}]])")
    if not doc.get("rule") and not doc.get("schedule"):
        raise RuleError(f"{path}: no [[rule]] or [[schedule]] in it")
    return {"rule": doc.get("rule", []), "schedule": doc.get("schedule", [])}


# -- conditions ------------------------------------------------------------------------------------------------------

class Series:
    """One resource's numbers in a window, with their sum, minimum and maximum kept as readings come and go, so an
    aggregate costs the same whatever the window holds."""

    __slots__ = ("high", "items", "low", "total")

    def __init__(self) -> None:
        self.items: deque[tuple[int, float]] = deque()  # (reading number, value)
        self.total = 0.0
        self.low: deque[tuple[int, float]] = deque()  # increasing values: the front is the minimum
        self.high: deque[tuple[int, float]] = deque()  # decreasing values: the front is the maximum

    def add(self, n: int, value: float) -> None:
        self.items.append((n, value))
        self.total += value
        while self.low and self.low[-1][1] >= value:
            self.low.pop()
        self.low.append((n, value))
        while self.high and self.high[-1][1] <= value:
            self.high.pop()
        self.high.append((n, value))

    def drop_through(self, n: int) -> None:
        """Forget the readings numbered n and before."""
        while self.items and self.items[0][0] <= n:
            self.total -= self.items.popleft()[1]
        if not self.items:
            self.total = 0.0  # no rounding left behind
        while self.low and self.low[0][0] <= n:
            self.low.popleft()
        while self.high and self.high[0][0] <= n:
            self.high.popleft()

    def aggregate(self, kind: str) -> float | None:
        if not self.items:
            return None
        if kind == "avg":
            return self.total / len(self.items)
        if kind == "min":
            return self.low[0][1]
        if kind == "max":
            return self.high[0][1]
        return self.items[-1][1] - self.items[0][1]  # delta


class Window:
    """A rule's recent readings of one device: the last N seconds or the last N readings (at most MAX_WINDOW)."""

    __slots__ = ("n", "readings", "resources", "seconds", "series", "times")

    def __init__(self, seconds: float | None = None, readings: int | None = None,
                 resources: Iterable[str] | None = None) -> None:
        self.resources = tuple(resources) if resources is not None else None  # the ones aggregated (None: all)
        self.seconds = seconds
        self.readings = min(readings or MAX_WINDOW, MAX_WINDOW)
        self.n = 0
        self.times: deque[tuple[int, float]] = deque()
        self.series: dict[str, Series] = {}

    def add(self, at: float, values: Mapping[str, Any]) -> None:
        """Take a reading's numbers into the window, dropping what falls out of it."""
        self.n += 1
        self.times.append((self.n, at))
        for name in values if self.resources is None else self.resources:
            value = values.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                series = self.series.get(name)
                if series is None:
                    series = self.series[name] = Series()
                series.add(self.n, value)
        cut = 0
        if self.seconds:
            while self.times and self.times[0][1] < at - self.seconds:
                cut = self.times.popleft()[0]
        while len(self.times) > self.readings:
            cut = self.times.popleft()[0]
        if cut:
            for series in self.series.values():
                series.drop_through(cut)

    def __len__(self) -> int:
        return len(self.times)


class Subject:
    """What a condition is evaluated on: the reading's values, and the window for the aggregates."""

    __slots__ = ("values", "window")

    def __init__(self, values: Mapping[str, Any], window: Window | None = None) -> None:
        self.values = values
        self.window = window


def resolve(subject: Subject, name: str) -> Any:
    if name in subject.values:
        return subject.values[name]
    window = subject.window
    if window is not None:
        if name == "count":
            return len(window)
        kind, _, resource = name.partition("_")
        if kind in AGGREGATES and resource in window.series:
            value = window.series[resource].aggregate(kind)
            if value is not None:
                return value
    raise _engine().SymbolResolutionError(name)


TYPES = {"int": "FLOAT", "float": "FLOAT", "bool": "BOOLEAN", "string": "STRING"}  # rule-engine's names


def _symbols(model: Model, windowed: bool) -> dict[str, Any]:
    types = _engine().DataType
    symbols = {name: getattr(types, TYPES[r.type]) for name, r in model.resources.items()}
    if windowed:
        symbols["count"] = types.FLOAT
        for name, r in model.resources.items():
            if r.type in ("int", "float"):
                symbols.update({f"{kind}_{name}": types.FLOAT for kind in AGGREGATES})
    return symbols


def _position(text: str, symbol: str) -> str:
    found = re.search(rf"\b{re.escape(symbol)}\b", text)
    return f" at column {found.start() + 1}" if found else ""


def window_size(body: dict[str, Any]) -> int:
    """Readings a rule's window keeps for one device at most (a window of time counted as full)."""
    window = body.get("window")
    if window is None:
        return 0
    return min(window, MAX_WINDOW) if isinstance(window, int) and not isinstance(window, bool) else MAX_WINDOW


def budget_problem(bodies: Iterable[dict[str, Any]]) -> str:
    """What in a gateway's rules together would make judging a reading too slow or too big, or ""."""
    bodies = list(bodies)
    if len(bodies) > MAX_RULES_TOTAL:
        return f"{len(bodies):,} rules; at most {MAX_RULES_TOTAL:,} (every reading is judged by each rule that covers its device)"
    size = sum(condition_size(b) for b in bodies)
    if size > MAX_CONDITIONS_TOTAL:
        return (f"conditions of {size:,} characters; at most {MAX_CONDITIONS_TOTAL:,} (every reading is judged by each "
                "rule that covers its device)")
    # rules with the same window share it (one per device, whatever the number of rules)
    windows = sum(window_size(b) for b in {json.dumps(b.get("window")): b for b in bodies}.values())
    if windows > MAX_WINDOWS_TOTAL:
        return (f"windows holding {windows:,} readings a device; at most {MAX_WINDOWS_TOTAL:,} (a window of time counts "
                f"as {MAX_WINDOW:,}): shorter windows, or fewer rules with one")
    return ""


def hide_notify_secrets(rules: Iterable[Any]) -> None:
    """Notification URLs carry their targets' secrets (tokens, passwords): for a viewer, only their scheme shows."""
    for rule in rules:
        if isinstance(rule, dict) and isinstance(rule.get("notify"), list):
            rule["notify"] = [f"{str(url).partition('://')[0]}://(hidden)" for url in rule["notify"]]


def condition_size(body: dict[str, Any]) -> int:
    """Characters of a rule's conditions (what MAX_CONDITIONS_TOTAL counts)."""
    return sum(len(body[k]) for k in ("when", "clear") if isinstance(body.get(k), str))


def compile_condition(rule: str, key: str, text: Any, model: Model | None = None, windowed: bool = False) -> Any:
    """A compiled rule-engine expression; with a model, its symbols and types are checked now, not at run time."""
    if not isinstance(text, str) or not text.strip():
        raise RuleError(f"rule {rule!r}: {key!r} must be a condition such as \"temperature > 30\"")
    if len(text) > MAX_CONDITION:
        raise RuleError(f"rule {rule!r}: {key} is longer than {MAX_CONDITION} characters")
    rule_engine = _engine()
    if model is None:
        context = rule_engine.Context(resolver=resolve)
    else:
        context = rule_engine.Context(resolver=resolve,
                                      type_resolver=rule_engine.type_resolver_from_dict(_symbols(model, windowed)))
    costly = _costly(text)
    if costly:
        # A condition is judged on every reading, on the gateway's loop: its cost must be small and bounded by its
        # text. Python's regular expressions backtrack (`"a"*40 + "!" =~ "(a|aa)+$"` held relay and gateway 20 s
        # each; the engine even runs one on literals while it compiles), `$sum($range(10000000))` takes 23 s, and a
        # comprehension loops over whatever it is given. Conditions compare values instead.
        raise RuleError(f"rule {rule!r}: {key} {wire.clip(text, 80)!r}: {costly} not allowed in conditions: they can "
                        "take unbounded time; compare values instead (==, in, <, and, or)")
    try:
        compiled = rule_engine.Rule(text, context=context)
    except rule_engine.RuleSyntaxError as exc:
        where = f"column {exc.token.lexpos + 1}" if exc.token is not None else "the end"
        raise RuleError(f"rule {rule!r}: {key} {text!r}: syntax error at {where}") from exc
    except rule_engine.SymbolResolutionError as exc:
        hint = f" (did you mean {exc.suggestion!r}?)" if exc.suggestion else ""
        assert model is not None
        raise RuleError(f"rule {rule!r}: {key} {text!r}: unknown resource {exc.symbol_name!r} for model "
                        f"{model.name!r}{_position(text, exc.symbol_name)}{hint}") from exc
    except rule_engine.EngineError as exc:
        about = f" for model {model.name!r}" if model is not None else ""
        raise RuleError(f"rule {rule!r}: {key} {text!r}: {exc.message}{about}") from exc
    except RecursionError as exc:  # `not not not ...` a few hundred deep exhausts the parser's stack
        raise RuleError(f"rule {rule!r}: {key} is nested too deep") from exc
    return compiled


@functools.cache
def _lexer() -> Any:
    """The engine's lexer, built once (building it takes about a second)."""
    return _engine().parser.Parser()._lexer


PATTERN_TOKENS = frozenset({"EQ_FZM", "EQ_FZS", "NE_FZM", "NE_FZS"})  # rule-engine's =~ =~~ !~ !~~


def _costly(text: str) -> str:
    """What in a condition could take unbounded time (regular expressions, the engine's built-in functions such as
    $range, comprehensions), or "": read by the engine's own lexer before anything is compiled (a string that merely
    contains "=~" or "$range" is not one)."""
    lexer = _lexer().clone()
    lexer.input(text)
    previous = None
    try:
        for token in iter(lexer.token, None):
            if token.type in PATTERN_TOKENS:
                return "regular expressions (=~, =~~, !~, !~~) are"
            if token.type == "SYMBOL" and str(token.value).startswith("$"):
                return f"built-in functions ({token.value}) are"
            if token.type == "FOR":
                return "comprehensions ([... for ... in ...]) are"
            # the engine's numbers are Decimals of any size: 1e999999, or a value raised to a huge power, made into an
            # integer by .ceiling took 40 s a reading
            if token.type == "POW":
                return "powers (**) are"
            if token.type in ("BWLSH", "BWRSH"):  # 1 << temperature * 100000 took 7 s a reading
                return "bit shifts (<<, >>) are"
            if token.type == "SYMBOL" and previous == "ATTR" and token.value in ("ceiling", "floor"):
                return f"rounding to an integer (.{token.value}) is"
            if token.type == "FLOAT" and not _float_sized(str(token.value)):
                return f"numbers beyond a float's range ({token.value}) are"
            previous = token.type
    except Exception:  # an illegal character: the compile that follows says where
        return ""
    return ""


def _float_sized(literal: str) -> bool:
    try:
        number = decimal.Decimal(literal.replace("_", ""))
    except (decimal.InvalidOperation, ValueError):
        return True  # not a plain number (hex, octal): the engine says what it makes of it
    return number.is_finite() and (number == 0 or -330 <= number.adjusted() <= 308)


# -- judging fast ---------------------------------------------------------------------------------------------------
# rule-engine judges a condition in 4-8 us (each symbol through its context, each number made a Decimal); 100 rules on
# every reading took ingest to 0.135x. A condition built only of comparisons, and/or/not, resource names and literals
# is also turned into Python closures that answer the same as the engine in well under a microsecond: it was parsed
# and checked by the engine first (the same errors), numbers compare as the engine's Decimals do (a float's shortest
# repr is what the engine converts, and that conversion keeps order; a literal is used only when it survives the trip
# to a float and back), values of another kind than the engine's scalars are judged by the engine itself.

Judge = Callable[[Subject], Any]


class _EngineNeeded(Exception):
    """A value the closures do not judge (a list, a mapping): the engine judges this reading."""


class _Unjudgeable(Exception):
    """What the engine would raise as an evaluation error (a type mismatch, a missing value): the reading is not judged."""


KINDS: dict[type, type] = {int: float, float: float, bool: bool, str: str, type(None): type(None)}  # the engine's


def _symbol(name: str) -> Judge:
    kind, _, resource = name.partition("_")
    if name == "count" or kind in AGGREGATES:  # as `resolve`: the reading's own value of that name first
        def aggregate(subject: Subject) -> Any:
            values = subject.values
            if name in values:
                return values[name]
            window = subject.window
            if window is not None:
                if name == "count":
                    return len(window)
                series = window.series.get(resource)
                if series is not None:
                    found = series.aggregate(kind)
                    if found is not None:
                        return found
            raise _Unjudgeable(name)
        return aggregate

    def value(subject: Subject) -> Any:
        values = subject.values
        if name in values:
            return values[name]  # its kind is checked where it is compared (truth is the same for the engine's values)
        raise _Unjudgeable(name)
    return value


def _literal(value: Any) -> Judge | None:
    if isinstance(value, decimal.Decimal):
        as_float = float(value)
        if not math.isfinite(as_float) or decimal.Decimal(repr(as_float)) != value:
            return None  # more digits than a float holds: the engine's Decimal answers differently
        value = as_float
    elif value is not None and not isinstance(value, bool | str):
        return None
    return lambda subject: value


def _ordered(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def compare(left: Any, right: Any) -> bool:
        kind = KINDS.get(type(left))
        if kind is None or kind is not KINDS.get(type(right)):
            if kind is None or type(right) not in KINDS:
                raise _EngineNeeded
            raise _Unjudgeable("data type mismatch")
        if left is None:
            return op in (operator.ge, operator.le)
        if left != left or right != right:  # NaN: the engine's Decimal raises
            raise _Unjudgeable("NaN")
        return op(left, right)
    return compare


def _equal(left: Any, right: Any) -> bool:
    kind = KINDS.get(type(left))
    if kind is None or type(right) not in KINDS:
        raise _EngineNeeded
    return kind is KINDS[type(right)] and left == right


OPERATORS = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}
ORDERED = {t: _ordered(op) for t, op in OPERATORS.items()}


def _not(operand: Judge) -> Judge:
    return lambda subject: not operand(subject)


def _logic(kind: str, left: Judge, right: Judge) -> Judge | None:
    if kind == "and":
        return lambda subject: bool(left(subject) and right(subject))
    if kind == "or":
        return lambda subject: bool(left(subject) or right(subject))
    return None


def _equality(negate: bool, left: Judge, right: Judge) -> Judge:
    return lambda subject: _equal(left(subject), right(subject)) != negate


def _comparison(kind: str, left: Judge, right: Judge, number: float | None) -> Judge:
    compare = ORDERED[kind]
    if number is None:
        return lambda subject: compare(left(subject), right(subject))
    # against a number literal (most conditions): a number compares at once, anything else as above
    raw = OPERATORS[kind]

    def judge(subject: Subject) -> bool:
        value = left(subject)
        if (type(value) is float or type(value) is int) and value == value:
            return raw(value, number)
        return compare(value, number)
    return judge


def fast_judge(condition: Any) -> Judge | None:
    """The compiled rule-engine condition as Python closures, or None if it has a part they do not cover (arithmetic,
    attributes, functions...: the engine judges those conditions)."""
    ast = _engine().ast
    undefined = _engine().DataType.UNDEFINED

    def build(node: Any) -> Judge | None:
        kind = type(node)
        if kind is ast.Statement:
            return build(node.expression)
        if kind is ast.SymbolExpression:
            return _symbol(node.name) if node.scope is None and node.result_type == undefined else None
        if kind in (ast.FloatExpression, ast.BooleanExpression, ast.StringExpression, ast.NullExpression):
            return _literal(node.value)
        if kind is ast.UnaryExpression and node.type == "not":
            operand = build(node.right)
            return None if operand is None else _not(operand)
        if kind in (ast.LogicExpression, ast.ComparisonExpression, ast.ArithmeticComparisonExpression):
            left, right = build(node.left), build(node.right)
            if left is None or right is None:
                return None
            if kind is ast.LogicExpression:
                return _logic(node.type, left, right)
            if node.type in ("eq", "ne"):
                return _equality(node.type == "ne", left, right)
            if node.type not in ORDERED:
                return None
            number = node.right.value if type(node.right) is ast.FloatExpression else None
            return _comparison(node.type, left, right, None if number is None else float(number))
        return None

    return build(condition.statement)


def holds(condition: Any, subject: Subject, judge: Judge | None = None) -> bool | None:
    """Whether the condition holds; None when it cannot be judged on this reading (a value it needs is missing, or
    has the wrong type): the rule's state stays as it was. `judge` is the condition's fast_judge, if it has one."""
    if judge is not None:
        try:
            return bool(judge(subject))
        except _EngineNeeded:
            pass
        except (_Unjudgeable, ArithmeticError, RecursionError, MemoryError):
            return None
    try:
        return bool(condition.matches(subject))
    # evaluated only when something was raised; a Decimal that cannot compare, a stack too shallow for the condition
    except (_engine().EngineError, ArithmeticError, TypeError, RecursionError, MemoryError):  # TypeError: "a" + 1
        return None


# -- rules and schedules ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Action:
    """What a rule or schedule does: set desired state, run a command, or export the reading, with retries."""
    set: dict[str, Any] | None = None  # desired twin state
    command: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    device: str | None = None  # None: the device the rule fired for
    timeout: float = 10.0  # a command's
    retries: int = 2  # further tries of an action that failed (device offline, timeout), with growing waits
    export: str | None = None  # the name of an export sink (select = "rules") the reading is sent to

    def describe(self) -> str:
        target = self.device or "the device"
        if self.export is not None:
            return f"export the reading to {self.export}"
        if self.set is not None:
            return f"set {json.dumps(self.set, separators=(',', ':'))} on {target}"
        return f"command {self.command} {json.dumps(self.args, separators=(',', ':'))} to {target}"


def parse_action(owner: str, body: Any) -> Action:
    """One action table of a rule file, checked; a RuleError says which key of which rule is wrong."""
    if not isinstance(body, dict):
        raise RuleError(f"{owner}: an action must be a table such as {{ set = {{ led = true }} }}")
    unknown = set(body) - ACTION_KEYS
    if unknown:
        raise RuleError(f"{owner}: unknown action key {sorted(unknown)[0]!r} (expected one of {sorted(ACTION_KEYS)})")
    if sum(key in body for key in ("set", "command", "export")) != 1:
        raise RuleError(f"{owner}: an action has one of 'set' (desired state), 'command' or 'export' (a sink)")
    if "export" in body and (not isinstance(body["export"], str) or not body["export"]):
        raise RuleError(f"{owner}: 'export' must be the name of an export sink")
    if "set" in body and (not isinstance(body["set"], dict) or not body["set"]):
        raise RuleError(f"{owner}: 'set' must be a table of desired values such as {{ led = true }}")
    if "command" in body and (not isinstance(body["command"], str) or not body["command"]):
        raise RuleError(f"{owner}: 'command' must be a command name")
    if not isinstance(body.get("args", {}), dict):
        raise RuleError(f"{owner}: 'args' must be a table")
    device = body.get("device")
    if device is not None and (not isinstance(device, str) or not device):
        raise RuleError(f"{owner}: 'device' must be a device id")
    retries = body.get("retries", 2)
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 10:
        raise RuleError(f"{owner}: 'retries' must be a whole number from 0 to 10")
    timeout = parse_duration(body.get("timeout", 10), f"{owner}: timeout")
    if timeout <= 0:
        raise RuleError(f"{owner}: 'timeout' must be above 0")
    return Action(body.get("set"), body.get("command"), dict(body.get("args", {})), device, timeout, retries,
                  body.get("export"))


def _table(kind: str, body: Any, keys: set[str]) -> tuple[str, str]:
    """A [[rule]] or [[schedule]] table's name, and how errors name it; refuses what is not one."""
    if not isinstance(body, dict):
        raise RuleError(f"a {kind} must be a table ([[{kind}]])")
    name = body.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise RuleError(f"{kind} {json.dumps(name)}: a name must be 1-64 letters, digits, '_', '.', '-'")
    owner = f"{kind} {name!r}"
    unknown = set(body) - keys
    if unknown:
        raise RuleError(f"{owner}: unknown key {sorted(unknown)[0]!r} (expected one of {sorted(keys)})")
    return name, owner


def _devices(owner: str, body: dict[str, Any], required: bool) -> tuple[str, ...]:
    devices = body.get("devices", [] if not required else None)
    if isinstance(devices, str):
        devices = [devices]
    if not isinstance(devices, list) or not all(isinstance(d, str) and d for d in devices):
        raise RuleError(f"{owner}: 'devices' must be a list of device ids or patterns such as \"greenhouse-*\"")
    return tuple(devices)


def _actions(owner: str, key: str, body: dict[str, Any]) -> tuple[Action, ...]:
    items = body.get(key, [])
    if not isinstance(items, list):
        raise RuleError(f"{owner}: {key!r} must be a list of actions")
    return tuple(parse_action(f"{owner} {key}[{i}]", item) for i, item in enumerate(items))


@dataclass(frozen=True)
class Rule:
    """A rule as parsed: the devices it watches, its conditions (compiled once), timing, severity and actions."""
    name: str
    devices: tuple[str, ...]  # ids or patterns ('*' for all); empty with a model: every device of that model
    model: str | None
    when: str
    clear: str | None
    window_seconds: float | None
    window_readings: int | None
    for_seconds: float
    cooldown: float
    severity: str
    notify: tuple[str, ...]
    actions: tuple[Action, ...]
    on_clear: tuple[Action, ...]
    body: dict[str, Any]  # as written, for listing and for the cloud
    # models whose devices this rule cannot judge (model name, why), set by `check_rule`: their devices are skipped
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def windowed(self) -> bool:
        return bool(self.window_seconds or self.window_readings)

    def watches(self, device: str, model: str | None) -> bool:
        if self.model is not None and model != self.model:
            return False
        if self.skipped and any(model == name for name, _ in self.skipped):
            return False
        if not self.devices:
            return self.model is not None
        return any(fnmatch.fnmatchcase(device, pattern) for pattern in self.devices)


def parse_rule(body: Any) -> Rule:
    """A rule from its table; raises RuleError naming the rule and what is wrong. Conditions are checked for syntax
    here and against models by `check_rule`."""
    name, owner = _table("rule", body, RULE_KEYS)
    devices = _devices(owner, body, required=False)
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise RuleError(f"{owner}: 'model' must be a model name")
    if not devices and model is None:
        raise RuleError(f"{owner}: say which devices it watches: 'devices' (ids, patterns, \"*\") or 'model'")
    window = body.get("window")
    window_seconds = window_readings = None
    if window is not None:
        if isinstance(window, int) and not isinstance(window, bool):
            if not 1 <= window <= MAX_WINDOW:
                raise RuleError(f"{owner}: a window of readings holds 1 to {MAX_WINDOW}")
            window_readings = window
        else:
            window_seconds = parse_duration(window, f"{owner}: window")
            if window_seconds <= 0:
                raise RuleError(f"{owner}: a window must be above 0 s")
    severity = body.get("severity", "warning")
    if severity not in SEVERITIES:
        raise RuleError(f"{owner}: severity {json.dumps(severity)} is not one of {', '.join(SEVERITIES)}")
    notify = body.get("notify", [])
    if isinstance(notify, str):
        notify = [notify]
    if not isinstance(notify, list) or not all(isinstance(u, str) and u for u in notify):
        raise RuleError(f"{owner}: 'notify' must be a list of notification URLs (apprise)")
    when, clear = body.get("when"), body.get("clear")
    compile_condition(name, "when", when)
    if clear is not None:
        compile_condition(name, "clear", clear)
    rule = Rule(name, devices, model, str(when), clear, window_seconds, window_readings,
                parse_duration(body.get("for", 0), f"{owner}: for"),
                parse_duration(body.get("cooldown", DEFAULT_COOLDOWN), f"{owner}: cooldown"), severity,
                tuple(notify), _actions(owner, "actions", body), _actions(owner, "on_clear", body), dict(body))
    return rule


def check_rule(rule: Rule, models: Mapping[str, Model | None]) -> Rule:
    """Check the rule's conditions against the models of what it watches (device id -> model of the registered
    devices, plus the models by name). Returns the rule as it can run: a rule over many devices (patterns, '*') skips
    the devices of a model it cannot judge (a resource that model lacks, a type mismatch: see `skipped`); a rule that
    fits none of them, or a rule for one model that does not fit it, raises RuleError naming the problem."""
    checked: dict[str, Model] = {}
    if rule.model is not None:
        by_name = {m.name: m for m in models.values() if m is not None}
        if rule.model not in by_name:
            raise RuleError(f"rule {rule.name!r}: unknown model {rule.model!r}")
        checked[rule.model] = by_name[rule.model]
    for device, model in models.items():
        if model is not None and rule.watches(device, model.name):
            checked.setdefault(model.name, model)
    skipped: dict[str, str] = {}
    for model in checked.values():
        try:
            compile_condition(rule.name, "when", rule.when, model, rule.windowed)
            if rule.clear is not None:
                compile_condition(rule.name, "clear", rule.clear, model, rule.windowed)
        except RuleError as exc:
            if rule.model is not None:
                raise
            skipped[model.name] = str(exc)
    unmodelled = any(model is None and rule.watches(device, None) for device, model in models.items())
    if skipped and len(skipped) == len(checked) and not unmodelled:
        raise RuleError(next(iter(skipped.values())))
    return replace(rule, skipped=tuple(sorted(skipped.items())))


@dataclass(frozen=True)
class Schedule:
    """A schedule as parsed: the devices it acts on, when (cron in a time zone, or every N seconds) and its actions."""
    name: str
    devices: tuple[str, ...]
    cron: str | None
    every: float | None
    timezone: str
    missed: str  # a run missed while the daemon was down: "skip" it, or "run_once" at start
    actions: tuple[Action, ...]
    body: dict[str, Any]

    def next_run(self, after: float) -> float:
        """The first run time strictly after `after` (epoch seconds)."""
        if self.every is not None:
            return after + self.every
        zone = zoneinfo.ZoneInfo(self.timezone)
        assert self.cron is not None
        start = datetime.fromtimestamp(after, zone)
        return float(croniter(self.cron, start).get_next(float))

    def watches(self, device: str) -> bool:
        return any(fnmatch.fnmatchcase(device, pattern) for pattern in self.devices)


def parse_schedule(body: Any) -> Schedule:
    """One schedule table of a rule file, checked (its cron, time zone and actions)."""
    name, owner = _table("schedule", body, SCHEDULE_KEYS)
    devices = _devices(owner, body, required=True)
    if not devices:
        raise RuleError(f"{owner}: 'devices' names no device")
    cron, every = body.get("cron"), body.get("every")
    if (cron is None) == (every is None):
        raise RuleError(f"{owner}: give either 'cron' (\"30 6 * * *\") or 'every' (\"10m\")")
    every_seconds = None
    if every is not None:
        every_seconds = parse_duration(every, f"{owner}: every")
        if every_seconds < 1:
            raise RuleError(f"{owner}: 'every' must be at least 1 s")
    elif not isinstance(cron, str) or not croniter.is_valid(cron):
        raise RuleError(f"{owner}: cron {json.dumps(cron)} is not a cron expression (minute hour day month weekday, "
                        "such as \"30 6 * * *\")")
    zone = body.get("timezone", "UTC")
    try:
        zoneinfo.ZoneInfo(zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise RuleError(f"{owner}: unknown time zone {json.dumps(zone)} (such as \"Europe/Berlin\" or \"UTC\")") from exc
    missed = body.get("missed", "skip")
    if missed not in MISSED:
        raise RuleError(f"{owner}: missed {json.dumps(missed)} is not one of {', '.join(MISSED)}")
    actions = _actions(owner, "actions", body)
    if not actions:
        raise RuleError(f"{owner}: no actions")
    if any(a.export for a in actions):
        raise RuleError(f"{owner}: a schedule has no reading to export (export is a rule's action)")
    return Schedule(name, devices, cron, every_seconds, zone, missed, actions, dict(body))


def parse_document(doc: dict[str, Any]) -> tuple[list[Rule], list[Schedule]]:
    """Rules and schedules of a rule file's document; names must be unique within it."""
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k, []), list) for k in ("rule", "schedule")):
        raise RuleError("a rule set is an object with 'rule' and 'schedule' lists")
    if len(doc.get("rule", [])) + len(doc.get("schedule", [])) > MAX_ITEMS:
        raise RuleError(f"more than {MAX_ITEMS} rules and schedules in one file")
    rules = [parse_rule(body) for body in doc.get("rule", [])]
    schedules = [parse_schedule(body) for body in doc.get("schedule", [])]
    seen: set[str] = set()
    for name in [r.name for r in rules] + [s.name for s in schedules]:
        if name in seen:
            raise RuleError(f"{name!r} is named twice in the file")
        seen.add(name)
    return rules, schedules


def check_notify_urls(rules: list[Rule]) -> None:
    """Every notification URL must be one apprise knows how to send to."""
    import apprise  # slow to import: paid by rule files with notifications, not by every CLI call

    for rule in rules:
        for url in rule.notify:
            if not apprise.Apprise().add(url):
                raise RuleError(f"rule {rule.name!r}: notify {url!r} is not a notification URL apprise understands "
                                "(such as json://host:port/path, ntfys://topic, mailto://user:pass@host)")


# -- evaluation ------------------------------------------------------------------------------------------------------

@dataclass
class Track:
    """One rule's state for one device."""

    state: str = "inactive"  # inactive | pending | firing
    since: float = 0.0  # when the condition began to hold
    quiet_until: float = 0.0  # the cooldown after a resolve
    window: Window | None = None
    # the last judgement of `when` and of `clear` with the values it was made on (rules without a window: the same
    # values give the same answer, and sensors repeat themselves)
    memo: list[tuple[tuple[Any, ...], bool | None] | None] = field(default_factory=lambda: [None, None])


@dataclass(frozen=True)
class Transition:
    rule: Rule
    device: str
    state: str  # pending | firing | resolved | cancelled (pending, then no longer holding)
    at: float
    values: dict[str, Any]


# a rule watching a device: the rule, its track for the device, its compiled when and clear, their closures, and
# whether the closures judge both
Entry = tuple[Rule, Track, Any, Any, tuple[Judge | None, Judge | None], bool]


class Engine:
    """The loaded rules and their state per device; `evaluate` turns one reading into the transitions it causes."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules: dict[str, Rule] = {}
        self.compiled: dict[str, tuple[Any, Any]] = {}
        self.judges: dict[str, tuple[Judge | None, Judge | None]] = {}  # the conditions as closures, where they can be
        # windows of the same span, shared by the rules that have one: one per span and device, over the resources
        # all those rules aggregate
        self.windows: dict[tuple[str, float | None, int | None], Window] = {}
        self.spans: dict[tuple[float | None, int | None], tuple[str, ...]] = {}  # span -> the resources aggregated
        self.aggregated: dict[str, tuple[str, ...]] = {}  # per rule: the resources its conditions aggregate
        self.symbols: dict[str, tuple[str, ...]] = {}  # per rule: the symbols its conditions use
        self.tracks: dict[tuple[str, str], Track] = {}
        self._watching: dict[tuple[str, str | None], list[Rule]] = {}
        self._entries: dict[tuple[str, str | None], list[Entry]] = {}
        self.load(list(rules))

    def load(self, rules: list[Rule]) -> None:
        """Take a new rule set; the state of rules that did not change is kept."""
        old = self.rules
        self.rules = {r.name: r for r in rules}
        self.compiled = {r.name: (compile_condition(r.name, "when", r.when),
                                  compile_condition(r.name, "clear", r.clear) if r.clear else None) for r in rules}
        self.judges = {name: (fast_judge(when), fast_judge(clear) if clear is not None else None)
                       for name, (when, clear) in self.compiled.items()}
        for name, conditions in self.compiled.items():
            symbols = set().union(*(c.context.symbols for c in conditions if c is not None))
            self.symbols[name] = tuple(sorted(symbols))
            self.aggregated[name] = tuple(sorted({s.partition("_")[2] for s in symbols
                                                  if s.partition("_")[0] in AGGREGATES}))
        self.tracks = {key: track for key, track in self.tracks.items()
                       if key[0] in self.rules and old.get(key[0]) == self.rules[key[0]]}
        spans: dict[tuple[float | None, int | None], set[str]] = {}
        for rule in rules:
            if rule.windowed:
                spans.setdefault((rule.window_seconds, rule.window_readings), set()).update(self.aggregated[rule.name])
        changed = {span for span, names in spans.items() if self.spans.get(span) != tuple(sorted(names))}
        self.spans = {span: tuple(sorted(names)) for span, names in spans.items()}
        # a window whose span is gone, or whose rules now aggregate other resources, starts again
        self.windows = {key: w for key, w in self.windows.items() if key[1:] in self.spans and key[1:] not in changed}
        live = {id(w) for w in self.windows.values()}
        for track in self.tracks.values():
            if track.window is not None and id(track.window) not in live:
                track.window = None
        self._watching.clear()
        self._entries.clear()

    def models_changed(self) -> None:
        """A device's model changed: which rules watch it is looked up anew."""
        self._watching.clear()
        self._entries.clear()

    def restore(self, rule: str, device: str, state: str, since: float) -> None:
        """Take up an alert that was open when the daemon stopped, so the rule resolves it."""
        if rule in self.rules and state == "firing":
            self.tracks[(rule, device)] = Track("firing", since)
            self._entries.clear()

    def _prepared(self, device: str, model: str | None) -> list[Entry]:
        """The rules watching a device with their state for it and what judging them needs, looked up once per device
        and rule set (forgotten whenever the rules, the models or a track change)."""
        key = (device, model)
        found = self._entries.get(key)
        if found is None:
            found = self._entries[key] = []
            for rule in self.watching(device, model):
                track = self.tracks.get((rule.name, device))
                if track is None:
                    track = self.tracks[(rule.name, device)] = Track()
                judges = self.judges[rule.name]
                fast = judges[0] is not None and (rule.clear is None or judges[1] is not None)
                found.append((rule, track, *self.compiled[rule.name], judges, fast))
        return found

    def watching(self, device: str, model: str | None) -> list[Rule]:
        key = (device, model)
        found = self._watching.get(key)
        if found is None:
            found = self._watching[key] = [r for r in self.rules.values() if r.watches(device, model)]
        return found

    def evaluate(self, device: str, model: str | None, at: float, values: dict[str, Any]) -> list[Transition]:
        """Judge one reading against the rules that watch its device; the alert transitions it causes."""
        out: list[Transition] = []
        added: set[int] = set()  # the windows this reading went into already (rules share them)
        plain = Subject(values)
        for rule, track, when, clear, judges, fast in self._prepared(device, model):
            subject = plain
            if rule.window_seconds or rule.window_readings:  # rule.windowed, without the call
                if track.window is None:
                    span = (rule.window_seconds, rule.window_readings)
                    track.window = self.windows.get((device, *span))
                    if track.window is None:
                        track.window = self.windows[(device, *span)] = Window(*span, self.spans[span])
                if id(track.window) not in added:
                    added.add(id(track.window))
                    track.window.add(at, values)
                subject = Subject(values, track.window)
                key = None
            else:
                # a condition the engine judges remembers its last answer for the same values: sensors repeat
                # themselves; a closure answers faster than the key would be made
                key = None if fast else tuple((values.get(s).__class__, values.get(s)) for s in self.symbols[rule.name])
            if track.state == "firing":
                done = (_judged(track, 1, clear, subject, key, judges[1]) if clear is not None
                        else _negate(_judged(track, 0, when, subject, key, judges[0])))
                if done:
                    track.state, track.quiet_until = "inactive", at + rule.cooldown
                    out.append(Transition(rule, device, "resolved", at, values))
                continue
            now_holds = _judged(track, 0, when, subject, key, judges[0])
            if now_holds is None:
                continue
            if not now_holds:
                if track.state == "pending":
                    track.state = "inactive"
                    out.append(Transition(rule, device, "cancelled", at, values))
                continue
            if track.state == "inactive":
                if at < track.quiet_until:
                    continue
                track.state, track.since = "pending", at
                if rule.for_seconds > 0:
                    out.append(Transition(rule, device, "pending", at, values))
            if track.state == "pending" and at - track.since >= rule.for_seconds:
                track.state = "firing"
                out.append(Transition(rule, device, "firing", at, values))
        return out


def _judged(track: Track, which: int, condition: Any, subject: Subject, key: tuple[Any, ...] | None,
            judge: Judge | None) -> bool | None:
    if key is not None:
        last = track.memo[which]
        if last is not None and last[0] == key:
            return last[1]
    result = holds(condition, subject, judge)
    if key is not None:
        track.memo[which] = (key, result)
    return result


def _negate(value: bool | None) -> bool | None:
    return None if value is None else not value
