"""deploy/README.md's walk-through, run word for word up to the sites' checks, and the compose
file held to the same commands."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from tests.deploy_harness import ROOT, env

GUIDE = ROOT / "deploy" / "README.md"


def guide_blocks() -> list[str]:
    """The bash blocks of the guide's 'Try it' section, in order."""
    text = GUIDE.read_text()
    section = text.split("## Try it", 1)[1].split("\n## ", 1)[0]
    return [textwrap_dedent(b) for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def textwrap_dedent(block: str) -> str:
    import textwrap

    return textwrap.dedent(block).strip()


@pytest.mark.slow
def test_the_guide_sets_up_a_federation_whose_sites_pass_their_checks(tmp_path):
    blocks = guide_blocks()
    install, setup, approve, checks = blocks[:4]
    assert install.startswith("python3.11 -m venv .venv")  # the README's install, not rerun
    os.symlink(sys.prefix, tmp_path / ".venv")
    os.symlink(ROOT / "deploy", tmp_path / "deploy")
    for block in (setup, approve, checks):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path,
                              capture_output=True, text=True, env=env(), timeout=600)
        assert done.returncode == 0, f"guide step failed:\n{block}\n{done.stdout}\n{done.stderr}"
    assert done.stdout.count("pass the data contract") == 2
    app_hash = subprocess.run([f"{sys.prefix}/bin/safn-client", "--app-hash"], env=env(),
                              capture_output=True, text=True).stdout.strip()
    site = yaml.safe_load((tmp_path / "demo" / "site_a.yaml").read_text())
    assert site["site"]["approved_apps"] == [app_hash]
    # the coordinator's config is valid as written (status of a run that has not started)
    status = subprocess.run([f"{sys.prefix}/bin/safn-server", "--config",
                             "demo/server.yaml", "--status"], cwd=tmp_path, env=env(),
                            capture_output=True, text=True)
    assert "no run there yet" in status.stderr


def test_compose_runs_the_guides_commands():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    text = GUIDE.read_text()
    for name, service in compose["services"].items():
        words = shlex.split(service["command"])
        while "--set" in words:  # container-only overrides: addresses, the third site's key
            i = words.index("--set")
            del words[i:i + 2]
        command = " ".join(words)
        # the same command as the guide's, with the federation folder as working directory
        guide_form = command.replace("server.yaml", "demo/server.yaml").replace(
            "site_", "demo/site_", 1 if name != "coordinator" else 0)
        assert f".venv/bin/{guide_form}" in text or name == "site_c", (name, guide_form)
        for setting in re.findall(r"--set (\S+)=", service["command"]):
            assert setting in ("server.host", "server.sites.site_c", "site.superlink"), setting
