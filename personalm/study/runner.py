"""A generic resumable stage runner: each stage writes into its own folder and is marked finished by
``done.json``, which records the ids of the stages it was made from and a hash of its settings.

A finished stage is skipped. A finished stage whose settings or inputs changed is moved aside to
``<stage>.stale-<time>``, never overwritten, and redone. A stage folder without ``done.json`` (a failed or
interrupted run) is resumed when it started from the same settings and inputs (``started.json``) and left
something to go on from (a checkpoint, predictions); else it is deleted and redone, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from personalm.paths import write_json

STARTED = "started.json"  # written when a stage starts: the settings and inputs it runs from


@dataclass
class Stage:
    name: str
    needs: list[str]
    run: Callable[..., dict]  # (its folder, done markers of its needs, resume=bool) -> outputs {key: relative path}
    settings: dict = field(default_factory=dict)  # what else its result depends on (config, args, judge)
    resumable: Optional[Callable[[Path], Optional[str]]] = None  # what an interrupted run left to go on from


def is_done(folder: Path, inputs: dict) -> Optional[dict]:
    """The stage's ``done.json`` if it is complete and made from these inputs, else None."""
    marker = folder / "done.json"
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    if done.get("inputs") != inputs or not all((folder / p).exists() for p in done.get("outputs", {}).values()):
        return None
    return done


def run_stage(root: Path, stage: Stage, done: dict[str, dict]) -> dict:
    """Run ``stage`` unless it is already done; returns its ``done.json``."""
    folder = root / stage.name
    settings = hashlib.sha256(json.dumps(stage.settings, sort_keys=True).encode()).hexdigest()[:16]
    inputs = {"settings": settings, **{n: done[n]["id"] for n in stage.needs}}
    finished = is_done(folder, inputs)
    if finished is not None:
        print(f"[study] {stage.name}: done, skipped ({folder})", flush=True)
        return finished
    if (folder / "done.json").is_file():  # finished from other inputs: keep it, out of the way
        stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
        while (aside := folder.with_name(f"{stage.name}.stale-{stamp}" + (f"-{n}" if n else ""))).exists():
            n += 1  # moved aside more than once within a second
        print(f"[study] {stage.name}: settings, inputs or outputs changed; the old folder moves to {aside}", flush=True)
        folder.rename(aside)
    resume = None
    if folder.exists() and not (folder / "done.json").is_file():  # a failed or interrupted run
        resume = _resumable(folder, stage, inputs)
        if resume is None:  # nothing it may go on from: never trusted
            print(f"[study] {stage.name}: incomplete earlier run removed", flush=True)
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if resume is None:
        write_json(folder / STARTED, {"inputs": inputs})  # what it started from: a rerun may go on from its
        print(f"\n[study] === {stage.name} ===", flush=True)  # checkpoints only if these are the same
    else:
        print(f"\n[study] === {stage.name} === resuming from {resume}", flush=True)
    outputs = stage.run(folder, {n: {**done[n], "folder": root / n} for n in stage.needs}, resume=resume is not None)
    marker = {"id": uuid.uuid4().hex, "inputs": inputs, "outputs": outputs,
              "seconds": round(time.perf_counter() - start, 1)}
    write_json(folder / "done.json", marker)
    return marker


def _resumable(folder: Path, stage: Stage, inputs: dict) -> Optional[str]:
    """What an interrupted run of ``stage`` left that a rerun may go on from (a checkpoint, the predictions
    written): only if it started from the same settings and inputs."""
    started = folder / STARTED
    if stage.resumable is None or not started.is_file() or json.loads(started.read_text()).get("inputs") != inputs:
        return None
    return stage.resumable(folder)


def output(done: dict, key: str) -> str:
    return str(Path(done["folder"]) / done["outputs"][key])


def written(folder: Path, relative: str) -> str:
    """``relative`` if the step wrote it, else a clear error (the stage then has no done.json)."""
    if not (folder / relative).exists():
        raise RuntimeError(f"{folder.name}: the step finished but {folder / relative} is missing")
    return relative


def run_all(root: Path, stages: list[Stage]) -> dict[str, dict]:
    """Run (or skip) every stage in order; returns each stage's ``done.json``."""
    done: dict[str, dict] = {}
    for stage in stages:
        done[stage.name] = run_stage(root, stage, done)
    return done
