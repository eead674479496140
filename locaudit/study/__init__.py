"""The whole study: its plan (`plan`: presets, arms, trials), the runner of its arms (`runner`) and the protocol
that drives them and judges stored answers (`protocol`). Modules import in that order only (plan <- runner <-
protocol), so the package has no import cycle."""

from locaudit.study.plan import (
    Arm,
    EvalSettings,
    Preset,
    StudySettings,
    edit_dir,
    load_preset,
    plan_arms,
    select_value,
    trial_path,
    with_overrides,
)
from locaudit.study.protocol import judge_run, run_study
from locaudit.study.runner import StudyContext, default_workers, run_arms

__all__ = ["Arm", "EvalSettings", "Preset", "StudySettings", "StudyContext", "default_workers", "edit_dir",
           "judge_run", "load_preset", "plan_arms", "run_arms", "run_study", "select_value", "trial_path",
           "with_overrides"]
