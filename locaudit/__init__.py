"""locaudit: does editing provide evidence for localization? (Wang & Veitch, arXiv 2502.11447).

The objects a notebook needs:

    import locaudit
    lm = locaudit.load_model()                          # embedded SmolLM2-135M-Instruct, or any HF id / local path
    task = locaudit.load_task("prefs.jsonl")            # or "caa:sycophancy", "truthfulqa", a Task object
    fit = locaudit.fit_edit(lm, task, "L12H3,L14H1")    # the optimal edit at those heads, trained to its optimum
    scores = task.evaluate(lm, fit.edit, task.split().test)   # per-item scores (pref_acc, margin, ...)
    result = locaudit.audit("L12H3,L14H1", task, "out/", locaudit.AuditConfig.from_preset("smoke"), lm=lm)
"""

from locaudit.audit import AuditConfig, AuditResult, audit
from locaudit.audit.run import fit_edit
from locaudit.errors import LocauditError
from locaudit.heads import Head, HeadSet, parse_heads
# importing the heuristics registers mean-difference steering ("meandiff") with `load_intervention`, so any import
# of locaudit (or of one of its modules, which runs this file first) can load every saved edit kind
from locaudit.heuristics import MeanDiffSteering
from locaudit.interventions import FullRank1, LocalizedRank1, NoEdit, load_intervention
from locaudit.models import LoadedModel, load_model, wrap_model
from locaudit.tasks import CAATask, ItemScores, PreferenceFileTask, Task, TruthfulQATask, load_task
from locaudit.training import FitConfig, FitResult

__version__ = "0.1.0"
__all__ = ["AuditConfig", "AuditResult", "CAATask", "FitConfig", "FitResult", "FullRank1", "Head", "HeadSet",
           "ItemScores", "LoadedModel", "LocalizedRank1", "LocauditError", "MeanDiffSteering", "NoEdit",
           "PreferenceFileTask", "Task", "TruthfulQATask", "__version__", "audit", "fit_edit", "load_intervention",
           "load_model", "load_task", "parse_heads", "wrap_model"]
