"""actedit.study: ``actedit run``, the whole study from one YAML file.

:mod:`~actedit.study.config` reads and checks the YAML, :mod:`~actedit.study.run` runs (or
resumes) it, :mod:`~actedit.study.report` writes ``results.json`` and ``report.md``.
"""

from .config import EvalSettings, StudyConfig, default_config_path, load_study, resolve_dtype
from .run import run_study

__all__ = ["EvalSettings", "StudyConfig", "default_config_path", "load_study", "resolve_dtype", "run_study"]
