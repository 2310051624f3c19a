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


import pytest  # noqa: E402


@pytest.fixture
def make_bed(tmp_path):
    """``make_bed(sites, aliases=None, proxy=True)``: a multi-host test bed (`tests.netbed`)
    removed when the test ends, also when it fails; skipped where network namespaces cannot be
    made, except in CI (``SAFN_NETBED_REQUIRED=1``)."""
    from contextlib import ExitStack

    from tests.netbed import bed_or_skip

    with ExitStack() as stack:
        def make(sites, aliases=None, proxy=True):
            folder = tmp_path / f"bed{len(stack._exit_callbacks)}"
            folder.mkdir()
            return stack.enter_context(bed_or_skip(pytest, folder, sites, aliases, proxy))

        yield make
