"""Certificates that do not name the host on the multi-host test bed (issue #29): real
`safn-server` / `safn-client` (and the coordinator's real flower-superlink) on hosts of their own.

- a coordinator whose certificate names another host than ``server.host`` (and one listening on
  0.0.0.0 whose certificate names no loopback name) refuses at once, before anything starts,
  in one line naming the file, server.host and the certificate's names (it used to end in
  "flower-superlink did not answer ... within 60 s": its own health check verified the
  certificate against server.host);
- a site configured with the coordinator's IP address, which the certificate does not name, and
  a site configured with a host name (leading to the coordinator) the certificate does not carry
  stop at once, although they would wait ``site.connect_wait`` = 600 s for a coordinator that
  does not answer, in one line naming the address or name they used and the names the
  certificate is for; no SuperNode is started.

Every wait is for an event (a process's end, a line it prints); timeouts are failure bounds."""

from __future__ import annotations

import subprocess
import sys
import time

from tests import netbed as nb
from tests.deploy_harness import ROOT, Federation, env, make_material

SITES = ("site_a", "site_b")
ELSEWHERE = "elsewhere.safn.test"
BOUND = 120  # seconds: a failure bound, never a delay


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error:")]


def other_certificates(root, hosts) -> dict:
    """Certificates (own CA, site keys) for ``hosts`` only."""
    subprocess.run([sys.executable, str(ROOT / "deploy" / "make_certs.py"), "--out", str(root),
                    "--sites", *SITES, "--hosts", *hosts], check=True, capture_output=True,
                   env=env())
    return root


def test_certificates_that_do_not_name_the_host_stop_both_ends_at_once(make_bed, tmp_path):
    bed = make_bed(SITES, aliases={ELSEWHERE: nb.COORDINATOR})
    material = make_material(tmp_path / "material", SITES, hosts=(nb.COORDINATOR,))
    feds: list[Federation] = []
    try:
        # -- the coordinator: a certificate for other.safn.test, server.host its own name ----
        wrong = other_certificates(tmp_path / "other", ["other.safn.test"])
        fed = Federation({**material, "certs": wrong}, tmp_path / "wrong", listed=SITES,
                         net=bed, secure_aggregation=False)
        feds.append(fed)
        start = time.monotonic()
        server = fed.server()
        assert server.wait(BOUND) == 2, server.output()
        took = time.monotonic() - start
        out = server.output()
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
        line = error_lines(out)[0]
        for said in (str(fed.server_yaml), f"'server.host' = {nb.COORDINATOR}",
                     str(wrong / "superlink.pem"), "(it is for: other.safn.test)",
                     "deploy/make_certs.py"):
            assert said in line, (said, line)
        assert not fed.run_dir.exists(), "nothing is started or written"
        # a wildcard server.host: the coordinator's own tools would reach it at 127.0.0.1
        server = fed.server("--set", "server.host=0.0.0.0")
        assert server.wait(BOUND) == 2, server.output()
        out = server.output()
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
        line = error_lines(out)[0]
        for said in ("'server.host' = 0.0.0.0", "127.0.0.1 or localhost",
                     str(wrong / "superlink.pem"), "(it is for: other.safn.test)"):
            assert said in line, (said, line)
        assert not fed.run_dir.exists()

        # -- the coordinator with a certificate for its name: the sites' cases ---------------
        fed = Federation(material, tmp_path / "fed", listed=SITES, net=bed,
                         secure_aggregation=False)
        feds.append(fed)
        server = fed.server()
        server.wait_for_output(r"SuperLink listening on " + nb.COORDINATOR, BOUND)
        by_address = fed.site("site_a", superlink=f"{nb.COORDINATOR_IP}:{nb.PORT}",
                              connect_wait=600)
        by_other_name = fed.site("site_b", superlink=f"{ELSEWHERE}:{nb.PORT}",
                                 connect_wait=600)
        cases = [(by_address, "IP address", nb.COORDINATOR_IP),
                 (by_other_name, "host name", ELSEWHERE)]
        for site, kind, used in cases:
            assert site.wait(BOUND) == 1, site.output()[-3000:]
            out = site.output()
            assert "Traceback" not in out, out
            errors = error_lines(out)
            assert len(errors) == 1, out
            line = errors[0]
            for said in (f"not issued for '{used}'", f"(it is for: {nb.COORDINATOR})",
                         f"connects by the {kind} {used}",
                         f"site.superlink = {nb.COORDINATOR}:{nb.PORT}",
                         "deploy/make_certs.py --hosts"):
                assert said in line, (said, line)
            assert "waiting up to" not in out and "refused to activate" not in out
            state = fed.folder / f"state_{site.name}"
            assert not (state / "supernode.pid").exists() and \
                not (state / "supernode.log").exists(), "no SuperNode was started"
        assert server.proc.poll() is None, "the coordinator is unaffected"
        print(f"coordinator refused in {took:.1f} s")
    finally:
        for fed in feds:
            fed.stop_all()
