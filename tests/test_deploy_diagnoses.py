"""What a site and a coordinator say when the federation cannot start: real safn-client and
safn-server processes, a real flower-superlink with TLS, on 127.0.0.1. Each test ends every
process it started, also when it fails."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest

from tests.deploy_harness import (BIN, ROOT, Proc, env, federations, free_port,
                                  make_material)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return make_material(tmp_path_factory.mktemp("federation"))


@pytest.fixture
def federation(material, tmp_path):
    with federations(material, tmp_path) as make:
        yield make


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def superlink_for_localhost(tmp_path):
    """A TLS SuperLink on 127.0.0.1 whose certificate (of its own CA) names only ``localhost``."""
    certs = tmp_path / "other_certs"
    subprocess.run([sys.executable, str(ROOT / "deploy" / "make_certs.py"), "--out", str(certs),
                    "--sites", "x", "--hosts", "localhost"], check=True, capture_output=True)
    port = free_port()
    link = Proc("superlink", [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port",
                              str(port), "--disable-runtime-dependency-installation",
                              "--database", str(tmp_path / "superlink.db"),
                              "--ssl-ca-certfile", str(certs / "ca.pem"),
                              "--ssl-certfile", str(certs / "superlink.pem"),
                              "--ssl-keyfile", str(certs / "superlink.key")],
                tmp_path / "superlink.log", {"FLWR_HOME": str(tmp_path / "flwr")})
    try:
        deadline = time.monotonic() + 120  # a bound for a failure; the event is the open port
        while not _listening(port):
            assert link.proc.poll() is None, link.output()[-2000:]
            assert time.monotonic() < deadline, "the SuperLink did not open its port"
            time.sleep(0.2)
        yield port, certs
    finally:
        link.kill()


def test_a_site_tells_nothing_answering_from_each_tls_mismatch(federation, superlink_for_localhost):
    port, other_certs = superlink_for_localhost
    fed = federation()
    # nothing listens on the port: said as such, after the (short) connect wait
    site = fed.site("site_a", superlink=f"127.0.0.1:{free_port()}", connect_wait=1)
    assert site.wait(240) == 1
    out = site.output()
    assert "nothing answers at 127.0.0.1:" in out and "(connection refused)" in out
    assert "site.connect_wait" in out and "refused to activate" not in out
    assert "Traceback" not in out
    # TLS mismatches stop at once, although the site would wait 10 minutes for an answer
    # (a site that waited would fail this test at `wait`)
    cases = [
        ({"superlink": f"127.0.0.1:{port}",
          "root_certificates": str(other_certs / "ca.pem")}, (),
         "its TLS certificate is not issued for '127.0.0.1' (it is for: localhost)"),
        ({"superlink": f"localhost:{port}"}, (),
         "its TLS certificate is not signed by site.root_certificates"),
        ({"superlink": f"localhost:{port}"}, ("--insecure",),
         "speaks TLS, but this site runs --insecure"),
    ]
    for i, (settings, args, expected) in enumerate(cases):
        site = fed.site(f"site_{'bc'[i % 2]}", *args, connect_wait=600, **settings)
        assert site.wait(240) == 1, site.output()[-2000:]
        out = site.output()
        assert expected in out, out[-2000:]
        assert "refused to activate" not in out and "Traceback" not in out
        assert "waiting up to" not in out


def test_a_coordinator_whose_sites_never_come_names_them_and_claims_no_checkpoint(federation):
    fed = federation(listed=("site_a", "site_b"), secure_aggregation=False, wait_for_sites=3)
    server = fed.server()
    assert server.wait(300) == 1
    out = server.output()
    assert "run stopped (run id " in out
    assert "no site was connected at the start of the run, for 3 s (federation.wait_for_sites)" \
        in out
    assert "Sites that never connected: site_a, site_b" in out
    assert "no round was completed, so there is no checkpoint" in out.lower()
    assert "finished:completed" not in out and "Checkpoints are kept" not in out
    assert not any((fed.run_dir / "checkpoints").glob("*.json"))
    assert out.count("no site was connected") == 1  # said once, not once per layer
    status = subprocess.run([str(BIN / "safn-server"), "--config", str(fed.server_yaml),
                             "--status"], capture_output=True, text=True, env=env())
    assert status.returncode == 0 and "failed" in status.stdout
    assert re.search(r"\(run id run-\w+, Flower run \d+\)", status.stdout), status.stdout
