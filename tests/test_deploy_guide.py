"""deploy/README.md's walk-through, run word for word up to the sites' checks; its "Across hosts"
section run word for word on the hosts of a network test bed (`tests.netbed`), a whole secure
federation; and the compose file held to the same commands."""

from __future__ import annotations

import json
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


ACROSS_HOSTS = "## Across hosts"
HOST_LABEL = re.compile(r"On the coordinator's host|On each site's host \(here (site_\w+)")
ONE_SHOT = ("--check", "--status", "--app-hash")


def across_hosts_blocks() -> list[tuple[str, str]]:
    """(host, block) for each bash block of the guide's 'Across hosts' section, in order: host is
    "coordinator", or the site a block for each site's host is written for ("here site_a"), as
    the last host label in the text before the block says."""
    text = GUIDE.read_text()
    assert f"\n{ACROSS_HOSTS}" in text, f"deploy/README.md has no section {ACROSS_HOSTS!r}"
    section = text.split(f"\n{ACROSS_HOSTS}", 1)[1].split("\n## ", 1)[0]
    out, last = [], 0
    for block in re.finditer(r"```bash\n(.*?)```", section, re.S):
        labels = list(HOST_LABEL.finditer(section, last, block.start()))
        assert labels, f"this block of {ACROSS_HOSTS!r} does not say on which host it runs:\n" \
                       f"{block.group(1)}"
        out.append((labels[-1].group(1) or "coordinator", textwrap_dedent(block.group(1))))
        last = block.end()
    return out


def long_running(block: str) -> bool:
    """A block that starts the coordinator or a site (one command that runs until the run ends),
    as opposed to a one-shot step."""
    return "\n" not in block and block.startswith((".venv/bin/safn-server ",
                                                   ".venv/bin/safn-client ")) \
        and not any(flag in block.split() for flag in ONE_SHOT)


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


@pytest.mark.slow
@pytest.mark.timeout(1500)  # a failure bound: 6-9 min here at loads of 20-80 on 2 cores
def test_the_across_hosts_section_runs_on_separate_hosts(tmp_path, make_bed, monkeypatch):
    """Every bash block of "Across hosts" on the host it names (a block for each site's host on
    each of the three, with its site's name), the sites reaching the coordinator as
    coordinator.example.org through their own links: a secure three-site run to its bundle."""
    from tests import netbed
    from tests.deploy_harness import Proc

    blocks = across_hosts_blocks()
    sites = ["site_a", "site_b", "site_c"]
    bed = make_bed(sites, aliases={"coordinator.example.org": netbed.COORDINATOR})
    os.symlink(sys.prefix, tmp_path / ".venv")
    os.symlink(ROOT / "deploy", tmp_path / "deploy")
    monkeypatch.chdir(tmp_path)  # the guide's commands run from the folder holding .venv, demo/

    def runs(host: str, block: str) -> list[tuple[netbed.Host, str, str]]:
        """(the host, a name for it, the block as that host runs it)."""
        if host == "coordinator":
            return [(bed.coordinator, "coordinator", block)]
        return [(bed.sites[s], s, block.replace(host, s)) for s in sites]

    started: dict[str, Proc] = {}
    try:
        for host, block in blocks:
            for machine, name, text in runs(host, block):
                cmd = machine.command(["bash", "-euo", "pipefail", "-c", text])
                if long_running(text):
                    started[name] = Proc(name, cmd, tmp_path / f"{name}.log")
                    if name == "coordinator":  # the sites' keys registered, the run submitted
                        started[name].wait_for_output(r"run \d+ submitted", 300)
                    continue
                done = subprocess.run(cmd, capture_output=True, text=True, env=env(),
                                      timeout=600)
                assert done.returncode == 0, \
                    f"guide step on {name} failed:\n{text}\n{done.stdout}\n{done.stderr}"
        assert set(started) == {"coordinator", *sites}, sorted(started)
        server = started["coordinator"]
        assert server.wait(1200) == 0, server.output()[-4000:]
        out = server.output()
        assert "TLS, site authentication on" in out
        assert re.search(r"run completed after round \d+ \(run id run-", out), out[-3000:]
        assert (tmp_path / "demo" / "run" / "model").is_dir()
        history = json.loads((tmp_path / "demo" / "run" / "history.json").read_text())
        assert history and history[-1]["round"] >= 1
        server_yaml = yaml.safe_load((tmp_path / "demo" / "server.yaml").read_text())
        assert server_yaml["federation"]["secure_aggregation"] is True
        assert server_yaml["server"]["host"] == "coordinator.example.org"
        for site in sites:
            proc = started[site]
            assert proc.wait(300) == 0, proc.output()[-3000:]
            assert "done, the run completed" in proc.output()
            yaml_site = yaml.safe_load((tmp_path / "demo" / f"{site}.yaml").read_text())
            assert yaml_site["site"]["superlink"] == "coordinator.example.org:9092"
            # what it sent was summed: masked vectors (uint64) in its audit log
            audit = (tmp_path / "demo" / f"state_{site}" / "audit" / "outgoing.jsonl").read_text()
            assert "uint64" in audit
        # each site reached the coordinator by the name, through its own link of the bed
        stats = bed.control.stats()
        for site in sites:
            assert stats[site]["up"] > 0 and stats[site]["down"] > 0, stats
    finally:
        for proc in started.values():
            proc.kill()
