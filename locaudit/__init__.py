"""locaudit: does editing provide evidence for localization? (Wang & Veitch, arXiv 2502.11447)."""

from locaudit.errors import LocauditError

__version__ = "0.1.0"
__all__ = ["LocauditError", "__version__"]
