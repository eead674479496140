"""`locaudit audit`: is a localization claim backed by editing evidence? The optimal edit at the claim against
random locations of the same size and full alignment, on any task (see `run`, `verdict`, `report`)."""

from locaudit.audit.run import AuditConfig, Arm, audit, plan
from locaudit.audit.verdict import AuditResult

__all__ = ["Arm", "AuditConfig", "AuditResult", "audit", "plan"]
