"""The documentation is self-contained: every link and repository path it names exists in a
clone of the project, and nothing points at documents outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
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
