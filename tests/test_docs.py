"""The documentation is self-contained: every link, anchor and repository path it names exists
in a clone of the project, nothing points at documents outside the repository, the docs site
builds with ``mkdocs build --strict``, and the install that README and CI run is the one pinned
by ``constraints.txt``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unicodedata
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = "shared" + "/docs"  # spelt in two parts, so that this file does not mention it

# [text](target) or [text](target "title"); an image ![alt](target) matches too
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
BACKTICKED = re.compile(r"`([A-Za-z0-9_][A-Za-z0-9_./-]*)`")


def linked_docs() -> list[Path]:
    return [ROOT / "README.md", ROOT / "deploy" / "README.md",
            *sorted((ROOT / "docs").glob("*.md"))]


def relative_targets(text: str) -> list[str]:
    """The relative link targets of a markdown text, anchors removed; external links
    (http, https, mailto), same-page anchors and links inside code are skipped."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    out = []
    for target in LINK.findall(prose):
        if re.match(r"(?i)(https?|mailto):", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def broken_links(md: Path) -> list[str]:
    """Relative links of ``md`` whose file (or folder) does not exist, relative to md's folder."""
    return [t for t in relative_targets(md.read_text(encoding="utf-8"))
            if not (md.parent / t).exists()]


HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
HTML_ID = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.I)


def heading_texts(text: str) -> list[str]:
    """The ATX headings of a markdown text, outside code fences, as they read when rendered:
    inline code without its backticks, links as their text, no emphasis markers."""
    out = []
    for _, heading in HEADING.findall(FENCE.sub("", text)):
        heading = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        out.append(heading.replace("`", "").replace("*", ""))
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def mkdocs_slug(heading: str) -> str:
    """The anchor mkdocs gives a heading (Python-Markdown's toc.slugify)."""
    ascii_text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", ascii_text).strip().lower())


def anchors(md: Path, slug) -> set[str]:
    """The anchors of a markdown file under one slug rule, with the rule's suffix for a repeated
    heading (GitHub: -1, -2; mkdocs: _1, _2), and explicit <a id="..."> anchors."""
    text = md.read_text(encoding="utf-8")
    seen: dict[str, int] = {}
    out = set(HTML_ID.findall(text))
    for heading in heading_texts(text):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}{'_' if slug is mkdocs_slug else '-'}{n}")
    return out


def anchored_links(text: str) -> list[tuple[str, str]]:
    """(file, anchor) for every relative link with an anchor; file is '' for the same page."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    out = []
    for target in LINK.findall(prose):
        if re.match(r"(?i)(https?|mailto):", target) or "#" not in target:
            continue
        file, anchor = target.split("#", 1)
        out.append((file, anchor))
    return out


def broken_anchors(md: Path, docs_dir: Path | None = None) -> list[str]:
    """Anchored links of ``md`` whose target file has no such heading. Every anchor must hold on
    GitHub; one between two pages of ``docs_dir`` (the mkdocs site) must hold there too."""
    docs_dir = docs_dir or ROOT / "docs"
    out = []
    for file, anchor in anchored_links(md.read_text(encoding="utf-8")):
        target = (md.parent / file).resolve() if file else md
        if not target.is_file() or target.suffix != ".md":
            continue  # a missing file is broken_links' finding
        rules = [github_slug]
        if md.resolve().parent == docs_dir.resolve() and target.parent == docs_dir.resolve():
            rules.append(mkdocs_slug)
        if any(anchor not in anchors(target, rule) for rule in rules):
            out.append(f"{file}#{anchor}")
    return out


def top_folders() -> set[str]:
    """The repository's own top-level folders (not demo/ or runs/ that a user made)."""
    return {p.relative_to(ROOT).parts[0] for p in repo_text_files()
            if len(p.relative_to(ROOT).parts) > 1}


def missing_repo_paths(md: Path, tops: set[str]) -> list[str]:
    """Backticked paths such as `docs/privacy.md` or `safn_core/model/` that start with a
    top-level folder of the repository and exist neither from the root nor from md's folder."""
    out = []
    for path in BACKTICKED.findall(md.read_text(encoding="utf-8")):
        if "/" in path and path.split("/", 1)[0] in tops \
                and not (ROOT / path).exists() and not (md.parent / path).exists():
            out.append(path)
    return out


def repo_text_files() -> list[Path]:
    """Tracked and new (not ignored) *.py, *.md, *.yaml, *.toml files outside .venv."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
        files = [ROOT / name for name in listed if name]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist)
        files = []
        for folder, subfolders, names in os.walk(ROOT):
            subfolders[:] = [s for s in subfolders if not s.startswith(".")]
            files += [Path(folder) / n for n in names]
    return sorted(p for p in files
                  if p.suffix in (".py", ".md", ".yaml", ".toml") and p.is_file()
                  and ".venv" not in p.relative_to(ROOT).parts)


def citing_outside(files: list[Path]) -> list[Path]:
    """The files that cite the development tree's documents, which a clone does not have."""
    return [p for p in files if OUTSIDE in p.read_text(encoding="utf-8", errors="replace")]


@pytest.mark.parametrize("md", linked_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(md):
    assert md.is_file()
    assert broken_links(md) == [], f"{md.relative_to(ROOT)}: links to missing files"


@pytest.mark.parametrize("md", linked_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_anchor_names_a_heading(md):
    assert broken_anchors(md) == [], f"{md.relative_to(ROOT)}: links to headings that do not exist"


def test_the_anchor_check_finds_a_broken_anchor(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "other.md").write_text(
        "# Other\n\n## Federated vs pooled — across `cohorts`\n\n## Twice\n\n## Twice\n"
        "```\n## not a heading\n```\n<a id=\"kept\"></a>\n")
    page = docs / "page.md"
    page.write_text(
        "# Page\n\n## Here and there\n\n[a](#here-and-there) [b](#gone) [c](other.md#twice-1)\n"
        "[d](other.md#not-a-heading) [e](other.md#kept) [f](missing.md#x) [g](other.md)\n"
        "[h](other.md#federated-vs-pooled--across-cohorts)\n")
    # GitHub keeps both hyphens around the dropped dash, mkdocs merges them: the site breaks
    assert broken_anchors(page, docs) == [
        "#gone", "other.md#twice-1", "other.md#not-a-heading",
        "other.md#federated-vs-pooled--across-cohorts"]
    readme = tmp_path / "README.md"
    readme.write_text("[h](docs/other.md#federated-vs-pooled--across-cohorts) [i](docs/other.md#x)")
    assert broken_anchors(readme, docs) == ["docs/other.md#x"]  # GitHub's rule only


def test_the_docs_site_builds_without_warnings(tmp_path):
    """mkdocs.yml's nav, every link between pages and every anchor, as mkdocs itself sees them;
    --strict turns each warning into a failure."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "WARNING" not in log, \
        f"mkdocs build --strict failed (pip install -e '.[docs]'):\n{log}"
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "benchmarks" / "index.html").is_file()


README_TEST_MARKER = "# --- README: tests (keep identical to README.md) ---"


def bash_lines(md: Path) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", md.read_text(encoding="utf-8"), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readmes_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index(README_TEST_MARKER) + 1].strip()
    assert command in bash_lines(ROOT / "README.md"), "README's test command and .ci/run differ"
    assert command.endswith("-m pytest -q")
    assert "-c constraints.txt" in command
    # the main job installs the same way
    setup = command.rsplit(" && ", 1)[0]
    main_job = [line for line in bash_lines(ROOT / "README.md") if "safn-sim" in line][0]
    assert main_job == f"{setup} && .venv/bin/safn-sim --config configs/simulation.yaml"


def constraints() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and not name.startswith("-"), f"not name==version: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def installed_closure(name: str = "safn", extras: frozenset[str] = frozenset({"test"})) -> dict:
    """The installed distributions that ``name[extras]`` needs, transitively: {name: version}.
    Distributions a developer installed beside it are not included."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    out, seen, todo = {}, set(), [(name, extras)]
    while todo:
        dist_name, wanted = todo.pop()
        key = (canonicalize_name(dist_name), wanted)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            out[canonicalize_name(dist_name)] = None  # required, not installed
            continue
        out[canonicalize_name(dist.metadata["Name"])] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e})
                                         for e in wanted | {""}):
                todo.append((req.name, frozenset(req.extras)))
    return out


def test_constraints_pin_the_installed_stack():
    """Everything safn[test] installs is in constraints.txt at the version installed (so a new
    dependency, or an install without -c, shows here); refresh: bash .ci/refresh-constraints."""
    from packaging.specifiers import SpecifierSet

    pins = constraints()
    assert pins["torch"] == "2.13.0" and "safn" not in pins
    needed = installed_closure()
    assert {"torch", "flwr", "numpy", "mkdocs", "pytest", "ray"} <= set(needed)
    unlisted = sorted(n for n in needed if n not in pins and n not in ("safn", "pip", "wheel"))
    differ = sorted(f"{n} {v} (constraints.txt: {pins[n]})" for n, v in needed.items()
                    if n in pins and not SpecifierSet(f"=={pins[n]}").contains(v or "0",
                                                                               prereleases=True))
    assert unlisted == [] and differ == [], \
        f"needed but not in constraints.txt: {unlisted}; other versions installed: {differ}"


@pytest.mark.parametrize("md", linked_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_backticked_repository_path_exists(md):
    assert missing_repo_paths(md, top_folders()) == [], \
        f"{md.relative_to(ROOT)}: names paths that are not in the repository"


def test_the_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "other.md").write_text("x")
    md = tmp_path / "docs" / "page.md"
    md.write_text(
        "See [the other page](../other.md#a-section), [missing](nowhere.md),\n"
        "[missing with anchor](../gone.md#part \"title\"), [web](https://example.org/x.md),\n"
        "[mail](mailto:a@b.c), [here](#top), `[code](in-code.md)` and\n"
        "```\n[fenced](fenced.md)\n```\n![image](img/missing.png)\n")
    assert broken_links(md) == ["nowhere.md", "../gone.md", "img/missing.png"]
    md.write_text("[fine](../other.md) and [also fine](../docs/page.md#x)")
    assert broken_links(md) == []


def test_the_path_check_finds_a_missing_repository_path(tmp_path):
    md = tmp_path / "page.md"
    md.write_text("`docs/privacy.md`, `docs/no-such-page.md`, `safn_core/model/`, "
                  "`examples/x.yaml`, `<site.state_dir>/audit`, `runs/federation`")
    # examples/ and runs/ are not top-level folders of the repository: not checked
    assert missing_repo_paths(md, {"docs", "safn_core"}) == ["docs/no-such-page.md"]


def test_no_file_points_outside_the_repository():
    files = repo_text_files()
    # the listing sees new files too (this one, the docs), not only committed ones
    assert ROOT / "docs" / "federation.md" in files and Path(__file__).resolve() in files
    offenders = [str(p.relative_to(ROOT)) for p in citing_outside(files)]
    assert offenders == [], f"these files cite {OUTSIDE}, which a clone does not have"


def test_the_outside_check_finds_a_citation(tmp_path):
    cited = tmp_path / "cites.py"
    cited.write_text(f'"""Facts follow ``{OUTSIDE}/ppmi-data.md``."""\n')
    clean = tmp_path / "clean.md"
    clean.write_text("Facts follow [docs/ppmi-data.md](docs/ppmi-data.md).\n")
    assert citing_outside([cited, clean]) == [cited]
