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


def compose(configs: Iterable[str], args: Iterable[str] = (), find: Callable[[str], str] = str) -> dict:
    """The configuration of ``--config`` files then ``--key=value`` arguments (``--config=<file>`` among them
    merges that file there); values are read as YAML, as on the command line."""
    merged: dict = {}
    for arg in [f"--config={c}" for c in configs] + list(args):
        key, _, value = arg[2:].partition("=")
        if key == "config":
            merge(merged, yaml.safe_load(Path(find(value)).read_text()) or {})
        else:
            set_dotted(merged, key, yaml.safe_load(value) if value else value)
    return merged
