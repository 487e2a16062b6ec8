"""The stage runner on plain Python stages: skip what is done, resume an interrupted stage only from the
settings it started with, redo anything else from scratch."""

from pathlib import Path

import pytest

from personalm.study.runner import STARTED, Stage, run_stage


class Interrupted(Exception):
    pass


def stage(calls: list, fail: bool = False, settings: dict | None = None) -> Stage:
    """Writes ``checkpoint`` then (unless ``fail``) ``result``; resumable when a checkpoint is there."""
    def run(folder: Path, needs: dict, resume: bool = False) -> dict:
        calls.append({"resume": resume, "files": sorted(p.name for p in folder.iterdir())})
        (folder / "checkpoint").write_text("half way")
        if fail:
            raise Interrupted
        (folder / "result").write_text("done")
        return {"result": "result"}

    def resumable(folder: Path):
        return str(folder / "checkpoint") if (folder / "checkpoint").is_file() else None
    return Stage("fit", [], run, settings or {"lr": 1}, resumable)


def test_an_interrupted_stage_resumes_from_what_it_left(tmp_path, capsys):
    calls: list = []
    with pytest.raises(Interrupted):
        run_stage(tmp_path, stage(calls, fail=True), {})
    assert (tmp_path / "fit" / STARTED).is_file() and not (tmp_path / "fit" / "done.json").exists()
    done = run_stage(tmp_path, stage(calls), {})
    assert calls[1] == {"resume": True, "files": ["checkpoint", STARTED]}  # nothing deleted
    assert f"=== fit === resuming from {tmp_path / 'fit' / 'checkpoint'}" in capsys.readouterr().out
    assert done["outputs"] == {"result": "result"}
    run_stage(tmp_path, stage(calls), {})
    assert len(calls) == 2  # done: skipped


def test_other_settings_or_nothing_to_go_on_from_start_over(tmp_path, capsys):
    calls: list = []
    with pytest.raises(Interrupted):
        run_stage(tmp_path, stage(calls, fail=True), {})
    run_stage(tmp_path, stage(calls, settings={"lr": 2}), {})  # the checkpoint is of another run
    assert calls[1] == {"resume": False, "files": [STARTED]}
    assert "incomplete earlier run removed" in capsys.readouterr().out

    (tmp_path / "fit" / "done.json").unlink()  # interrupted after its last checkpoint was cleared
    (tmp_path / "fit" / "checkpoint").unlink()
    run_stage(tmp_path, stage(calls, settings={"lr": 2}), {})
    assert calls[2]["resume"] is False


def test_a_folder_without_a_start_record_is_not_trusted(tmp_path):
    """A stage folder left by a run that recorded nothing (an older version, or a hand-made folder)."""
    calls: list = []
    (tmp_path / "fit").mkdir()
    (tmp_path / "fit" / "checkpoint").write_text("whose?")
    run_stage(tmp_path, stage(calls), {})
    assert calls == [{"resume": False, "files": [STARTED]}]
