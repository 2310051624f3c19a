"""What every safn command shares: ``--config``, ``--set``, ``--out``, and clean error exits.

A user's mistake (`SafnError`) is printed as one line on stderr with exit status 2, never as a
traceback; Ctrl-C exits with 130. Output folders are created fresh: an existing non-empty folder
is never written into, so no earlier run or user file is overwritten.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from safn_core.config import SafnConfig, load_config
from safn_core.errors import SafnError
from safn_core.io import write_atomic, write_json  # noqa: F401  (re-exported for commands)

# Wide when writing to a file or pipe (CI logs, README captures) so tables are not cut.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 220)
err_console = Console(stderr=True, highlight=False)


def base_parser(prog: str, description: str, *, default_config: str | None = None,
                out: bool = True, tracking: bool = False) -> argparse.ArgumentParser:
    """An argument parser with the options every command takes (``tracking``: and
    ``--tracking [URI]``, MLflow experiment tracking; docs/tracking.md)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", metavar="FILE", default=default_config,
                        help="YAML configuration (see configs/); defaults apply where absent")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        dest="overrides",
                        help="override one config key, e.g. --set data.min_cell=10 (repeatable)")
    if out:
        parser.add_argument("--out", metavar="DIR", type=Path,
                            help="folder for this command's outputs (must be new or empty)")
    if tracking:
        parser.add_argument("--tracking", metavar="URI", nargs="?", const="", default=None,
                            help="log the run to MLflow at URI (without URI: the embedded store "
                                 "next to the run folders); same as --set tracking.enabled=true "
                                 "[--set tracking.uri=URI]")
    return parser


def config_from_args(args: argparse.Namespace) -> SafnConfig:
    overrides = list(args.overrides)
    uri = getattr(args, "tracking", None)
    if uri is not None:
        overrides.append("tracking.enabled=true")
        if uri:
            overrides.append(f"tracking.uri={uri}")
    return load_config(args.config, overrides)


def fresh_output_dir(path: Path, what: str = "--out", hint: str = "") -> Path:
    """Create ``path`` for outputs; refuse a non-empty existing folder or an existing file.

    ``hint`` replaces the default advice in the refusal (e.g. how to continue a run there)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SafnError(f"{what} {path}: a file of that name exists; choose another folder name")
    if path.is_dir() and any(path.iterdir()):
        raise SafnError(f"{what} {path}: folder exists and is not empty; nothing was written. "
                        + (hint or "Choose a new folder or remove this one yourself"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_main(fn: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a command's body; turn user errors into a one-line message and exit status."""
    try:
        code = fn(argv)
        return int(code or 0)
    except SafnError as exc:
        # the message as written: a bracket in it (e.g. '.[tracking]') is not Rich markup
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


def entry(fn: Callable[[list[str] | None], int | None]) -> Callable[[], None]:
    """Wrap a command body as a console-script entry point."""
    def main(argv: list[str] | None = None) -> None:
        sys.exit(run_main(fn, argv))
    return main
