"""`locaudit audit`: is a localization claim backed by editing evidence? The optimal edit at the claim against
random locations of the same size and full alignment, and the claim's steering heuristic at the claim against
the same random locations, on any task (see `run`, `claims`, `steering`, `verdict`, `report`)."""

from locaudit.audit.claims import HEURISTICS, Claim, resolve_claim
from locaudit.audit.config import AuditConfig
from locaudit.audit.run import Arm, audit, plan
from locaudit.audit.steering import STEERING
from locaudit.audit.verdict import AuditResult

__all__ = ["Arm", "AuditConfig", "AuditResult", "Claim", "HEURISTICS", "STEERING", "audit", "plan", "resolve_claim"]
