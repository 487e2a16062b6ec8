"""The study: the ComPO pipeline in one resumable command (``python -m personalm.study``).

Owns ``runner`` (generic stages with done markers and stale folders), ``settings`` (what the study runs on),
``steps`` (the CLI runs as stages), ``pipeline`` (the stages of the study, the closing summary), ``report`` (the
tables as data, rendered to ``report.md``) and ``__main__`` (the command). The top layer: May import every other part of
personalm.
"""

from personalm.study.pipeline import main, parse, stages
from personalm.study.runner import Stage, run_stage
from personalm.study.settings import StudySettings
from personalm.study.steps import REPO

__all__ = ["REPO", "Stage", "StudySettings", "main", "parse", "run_stage", "stages"]
