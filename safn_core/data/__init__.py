"""Data sources of safn: every one produces a `Cohort` (see `cohort`)."""

from safn_core.data.cohort import Cohort, LoadReport, Modality
from safn_core.data.ppmi_loader import load_ppmi

__all__ = ["Cohort", "LoadReport", "Modality", "load_ppmi"]
