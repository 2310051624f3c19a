import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

# The suite runs in parallel workers (pytest-xdist, pyproject's addopts). Two workers that each
# also run two OpenMP/torch threads on two cores oversubscribe them (a 1 s test took 60 s), so
# every worker, and every process a test starts (SuperLinks, SuperNodes, Ray, safn-* commands,
# which inherit this environment), computes on one thread.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
