"""A run's own folder (``personalm.paths.run_folder``): TensorBoard's folder with the default logger, the next
free ``lightning_logs/version_<N>`` with any other, picked once per trainer."""

from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.logger import DummyLogger

from personalm.paths import go_on_in, run_folder, runs


class FakeTrainer:
    """What ``run_folder`` reads of a trainer (one process: the broadcast hands the value back)."""

    def __init__(self, root: Path, *loggers):
        self.default_root_dir, self.loggers, self.is_global_zero = str(root), list(loggers), True
        self.strategy = self

    def broadcast(self, value):
        return value


def test_the_default_loggers_folder_is_the_runs(tmp_path):
    for n in (0, 1):
        (tmp_path / "lightning_logs" / f"version_{n}").mkdir(parents=True)
    logger = TensorBoardLogger(save_dir=tmp_path)
    folder = run_folder(FakeTrainer(tmp_path, logger))
    assert folder == Path(logger.log_dir) == tmp_path / "lightning_logs" / "version_2" and folder.is_dir()


def test_a_tensorboard_logger_after_another_logger_still_names_the_run(tmp_path):
    """[W&B-like, TensorBoard in the run folders]: the run's folder is TensorBoard's, not a second version."""
    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)
    tensorboard = TensorBoardLogger(save_dir=tmp_path)
    folder = run_folder(FakeTrainer(tmp_path, DummyLogger(), tensorboard))
    assert folder == Path(tensorboard.log_dir) == tmp_path / "lightning_logs" / "version_1"
    assert [p.name for p in runs(tmp_path)] == ["version_0", "version_1"]


def test_other_loggers_each_get_the_next_free_version_once(tmp_path):
    other = FakeTrainer(tmp_path, DummyLogger())  # as W&B or MLflow: a logger with folders of its own
    csv = FakeTrainer(tmp_path, CSVLogger(tmp_path, name="csv"))  # its own name: its logs are not the run's
    none = FakeTrainer(tmp_path)
    assert [run_folder(t).name for t in (other, csv, none, other)] == \
           ["version_0", "version_1", "version_2", "version_0"]  # asked again: the same folder
    assert [p.name for p in runs(tmp_path)] == ["version_0", "version_1", "version_2"]  # each made when picked
    tensorboard = FakeTrainer(tmp_path, TensorBoardLogger(save_dir=tmp_path))
    assert run_folder(tensorboard).name == "version_3"  # TensorBoard counts the same folders


def test_a_resumed_run_goes_on_in_its_folder(tmp_path):
    trainer = FakeTrainer(tmp_path, DummyLogger())
    old = tmp_path / "lightning_logs" / "version_0"
    (tmp_path / "lightning_logs" / "version_1").mkdir(parents=True)
    go_on_in(trainer, old)
    assert run_folder(trainer) == old


def test_a_version_made_by_a_run_started_beside_is_not_taken(tmp_path, monkeypatch):
    """Another run made ``version_0`` after this one listed the folders: this one takes ``version_1``."""
    import personalm.paths

    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)
    monkeypatch.setattr(personalm.paths, "runs", lambda root: [])  # the listing, made before the other run's
    assert run_folder(FakeTrainer(tmp_path, DummyLogger())).name == "version_1"
