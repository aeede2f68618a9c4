"""Rules the config schema attaches to its fields (ranges, choices, paths), and the walker that checks them.

The rules sit in the dataclass field metadata of tfmq_exp/config.py, so one place says what a value
may be; ``check_tree`` runs them all on the composed config before any work, and the error names the
key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from tfmq_exp.errors import UserError

RULE = "tfmq_rule"


def positive() -> dict[str, Any]:
    """A count or size: an integer >= 1 (a float > 0 for float fields)."""
    return {RULE: {"kind": "range", "lo": 0, "lo_open": True, "hi": None, "hi_open": False, "zero": None}}


def at_least(lo: float, zero: str | None = None) -> dict[str, Any]:
    """``value >= lo``; ``zero`` documents what 0 means when 0 is allowed."""
    return {RULE: {"kind": "range", "lo": lo, "lo_open": False, "hi": None, "hi_open": False, "zero": zero}}


def between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> dict[str, Any]:
    return {RULE: {"kind": "range", "lo": lo, "lo_open": lo_open, "hi": hi, "hi_open": hi_open, "zero": None}}


def choice(*options: str) -> dict[str, Any]:
    return {RULE: {"kind": "choice", "options": list(options)}}


def path_rule(kind: str) -> dict[str, Any]:
    """``file`` (must exist), ``exists`` (file or folder) or ``writable_dir`` (created if missing, must be writable)."""
    return {RULE: {"kind": "path", "path": kind}}


def describe_range(rule: dict[str, Any], is_int: bool) -> str:
    lo, hi = rule["lo"], rule["hi"]
    if is_int and lo is not None and rule["lo_open"]:
        lo, lo_open = math.floor(lo) + 1, False
    else:
        lo_open = rule["lo_open"]
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if rule['hi_open'] else '<='} {hi:g}")
    text = ("an integer " if is_int else "a number ") + " and ".join(parts)
    if rule.get("zero") and lo == 0 and not lo_open:
        text += f" (0 = {rule['zero']})"
    return text


def check_value(key: str, value: Any, rule: dict[str, Any], is_int: bool, nullable: bool = False) -> None:
    """Raise UserError naming ``key``, ``value`` and what is allowed, unless ``value`` fits ``rule``."""
    if rule["kind"] == "path":
        return  # paths are checked by check_paths, where the stage that needs them is known
    if value is None:
        if nullable:
            return
        raise UserError(f"{key} is null. Fix: set {key} to {_allowed(rule, is_int)}.")
    if rule["kind"] == "choice":
        if str(value) not in rule["options"]:
            raise UserError(f"{key}={value} is not allowed. Fix: use one of {rule['options']}.")
        return
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok_type and is_int and isinstance(value, float):
        ok_type = value.is_integer()
    if not ok_type:
        raise UserError(f"{key}={value!r} is not a number. Fix: set {key} to {_allowed(rule, is_int)}.")
    lo, hi = rule["lo"], rule["hi"]
    bad = not math.isfinite(float(value))
    bad = bad or (lo is not None and (value <= lo if rule["lo_open"] else value < lo))
    bad = bad or (hi is not None and (value >= hi if rule["hi_open"] else value > hi))
    if bad:
        raise UserError(f"{key}={value} is out of range. Fix: set {key} to {_allowed(rule, is_int)}.")


def _allowed(rule: dict[str, Any], is_int: bool) -> str:
    if rule["kind"] == "choice":
        return f"one of {rule['options']}"
    return describe_range(rule, is_int)


def _tokens(tp: Any) -> list[str]:
    return re.findall(r"[A-Za-z_]\w*", str(tp))  # config.py uses postponed annotations: types are strings


def _is_int_type(tp: Any) -> bool:
    return "int" in _tokens(tp) and "float" not in _tokens(tp)


def _is_nullable(tp: Any) -> bool:
    return "None" in _tokens(tp) or "Optional" in _tokens(tp)


def check_tree(schema: type, node: Any, prefix: str = "", paths: list[tuple[str, str, str]] | None = None) -> None:
    """Check every field of ``node`` (a DictConfig composed from ``schema``) that carries a rule.

    Path fields are not touched here; when ``paths`` is given, (key, value, kind) of each set one is appended.
    """
    if node is None:
        return
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        rule = f.metadata.get(RULE)
        if paths is None and rule is not None and rule["kind"] == "path":
            continue  # not even read: outside a run, paths such as ${hydra:runtime.output_dir} do not resolve
        value = node.get(f.name) if isinstance(node, (DictConfig, Mapping)) else getattr(node, f.name, None)
        sub = _dataclass_of(f.type)
        if sub is not None:
            if isinstance(value, (list, ListConfig)):
                for i, item in enumerate(value):
                    check_tree(sub, item, f"{key}[{i}].", paths)
            else:
                check_tree(sub, value, f"{key}.", paths)
            continue
        if rule is not None and rule["kind"] == "path":
            if paths is not None and value not in (None, ""):
                paths.append((key, str(value), rule["path"]))
        elif rule is not None:
            check_value(key, value, rule, _is_int_type(f.type), _is_nullable(f.type))


def check_mapping(prefix: str, node: Any, rules: dict[str, tuple[dict[str, Any], bool, bool]]) -> None:
    """Rules for free-form nodes (``evaluator``, ``quantizer.options``): name -> (metadata, is_int, nullable)."""
    if node is None:
        return
    for name, (meta, is_int, nullable) in rules.items():
        if name in node:
            check_value(f"{prefix}{name}", node[name], meta[RULE], is_int, nullable)


def _dataclass_of(tp: Any) -> type | None:
    """The schema dataclass a field holds (``X``, ``X | None`` or ``list[X]``), else None."""
    from tfmq_exp import config as schema

    for token in _tokens(tp):
        obj = getattr(schema, token, None)
        if isinstance(obj, type) and dataclasses.is_dataclass(obj):
            return obj
    return None


def writable_dir(key: str, value: str) -> Path:
    """Create ``value`` if needed and prove it writable with a probe file; one line naming ``key`` otherwise."""
    p = Path(value).expanduser()
    fix = f"set {key} to a folder you can write to"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".tfmq_write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{key}={value} is not a writable folder ({err.strerror or err}). Fix: {fix}.") from None
    return p


def existing(key: str, value: str, kind: str, fix: str) -> Path:
    p = Path(value).expanduser()
    if kind == "file" and not p.is_file():
        raise UserError(f"{key}={value}: no such file. Fix: {fix}.")
    if kind == "exists" and not p.exists():
        raise UserError(f"{key}={value}: no such file or folder. Fix: {fix}.")
    return p
