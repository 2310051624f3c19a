"""``safn-synth``: write a synthetic PPMI-style download (or one per site)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from safn_core.cli.common import base_parser, config_from_args, console, entry, fresh_output_dir
from safn_core.errors import SafnError


def run(argv: list[str] | None = None) -> int:
    parser = base_parser(
        "safn-synth",
        "Write a synthetic download that looks like a real PPMI download (same folders, file "
        "names, columns and codes), for tests, demos and simulations. Settings: the 'synth' "
        "section of the config.")
    parser.add_argument("--seed", type=int, help="shortcut for --set synth.seed=N")
    parser.add_argument("--per-site", action="store_true",
                        help="write one download per site (shortcut for --set synth.per_site=true)")
    args = parser.parse_args(argv)
    if args.seed is not None:
        args.overrides.append(f"synth.seed={args.seed}")
    if args.per_site:
        args.overrides.append("synth.per_site=true")
    if args.out is None:
        raise SafnError("--out is required: the folder to write the synthetic download into")
    cfg = config_from_args(args)
    from safn_core.synth import write_download

    out = fresh_output_dir(Path(args.out))
    out.rmdir()  # the writer creates it and refuses anything that exists and is not empty
    summary = write_download(cfg.synth, out)
    table = Table(title=f"synthetic PPMI-style download (seed {cfg.synth.seed})")
    table.add_column("what")
    table.add_column("count", justify="right")
    for key, value in summary.items():
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, (int, float, str)):
                    table.add_row(f"{key}: {k}", str(v))
        elif isinstance(value, (int, float, str)):
            table.add_row(key, str(value))
    console.print(table)
    console.print(f"written to {out}")
    return 0


main = entry(run)
