"""Composing YAML configs and ``--key=value`` arguments as the CLI's parser (jsonargparse) does: later files and
arguments override earlier ones, nested sections merge. A low layer beside ``paths``: imports nothing of
personalm. The study hashes a stage's composed configuration; the export command takes a run's model settings
from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import yaml


def merge(into: dict, update: dict) -> dict:
    """``update`` merged into ``into`` (in place), nested dicts key by key."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def set_dotted(into: dict, key: str, value) -> dict:
    """``into["a"]["b"]["c"] = value`` for ``key`` ``a.b.c``."""
    node = into
    *parents, last = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value
    return into


def arguments(args: Iterable[str]) -> list[tuple[str, str]]:
    """(key, value) of each ``--key=value`` or ``--key value`` argument, dashes removed, in order."""
    pairs, tokens = [], iter(args)
    for token in tokens:
        if not token.startswith("--"):
            raise ValueError(f"argument {token!r}: expected --key=value or --key value")
        key, sep, value = token[2:].partition("=")
        pairs.append((key, value if sep else next(tokens, "")))
    return pairs


def compose(configs: Iterable[str], args: Iterable[str] = (), find: Callable[[str], str] = str) -> dict:
    """The configuration of ``--config`` files then ``--key=value`` (or ``--key value``) arguments, as the CLI
    reads them: ``--config <file>`` among them merges that file there, ``--key+=<value>`` appends to a list,
    values are read as YAML."""
    merged: dict = {}
    for key, value in [("config", c) for c in configs] + arguments(args):
        if key == "config":
            merge(merged, yaml.safe_load(Path(find(value)).read_text()) or {})
        elif key.endswith("+"):
            key = key[:-1]
            node = merged
            for part in key.split(".")[:-1]:
                node = node.get(part) if isinstance(node.get(part), dict) else {}
            current = node.get(key.split(".")[-1])
            set_dotted(merged, key, (current if isinstance(current, list) else []) + [_value(value)])
        else:
            set_dotted(merged, key, _value(value) if value else value)
    return merged


def _value(text: str):
    """A command-line value as YAML reads it, and ``2e-7`` as the number the CLI's typed parser makes of it
    (YAML 1.1 reads a float without a dot as a string)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return value
