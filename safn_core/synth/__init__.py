"""The synthetic PPMI-style download: a latent participant model written as PPMI tables.

`write_download(cfg, out)` writes a folder that looks like a real PPMI download (same folders,
file names, columns and codes; see `safn_core.synth.download_files`), so that the real loader reads
it with no special path. `generate_truth(cfg)` returns the participant-level ground truth of the
same cohort and `simulate(cfg)` the whole drawn cohort (see `safn_core.synth.simulation`, which
names the modules of the model: population, severity, instruments and scales, MRI, FreeSurfer).
"""

from safn_core.synth.simulation import Simulation, generate_truth, simulate
from safn_core.synth.writer import write_download

__all__ = ["Simulation", "generate_truth", "simulate", "write_download"]
