"""The whole study: its plan (`plan`: presets, arms, trials), the runner of its arms (`runner`), the backends
that run them here or on a cluster (`backends`) and the protocol that drives them and judges stored answers
(`protocol`). Modules import in that order only (plan <- runner <- backends <- protocol), so the package has no
import cycle."""

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
from locaudit.study.backends import BACKENDS, LocalBackend, RayBackend, make_backend
from locaudit.study.protocol import judge_run, run_study
from locaudit.study.runner import ArmBackend, StudyContext, WorkerSetup, default_workers, run_arms

__all__ = ["Arm", "ArmBackend", "BACKENDS", "EvalSettings", "LocalBackend", "Preset", "RayBackend", "StudySettings",
           "StudyContext", "WorkerSetup", "default_workers", "edit_dir", "judge_run", "load_preset", "make_backend",
           "plan_arms", "run_arms", "run_study", "select_value", "trial_path", "with_overrides"]
