"""``safn-check``: load a site's data, print the load report and the data-contract check."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from safn_core.cli.common import (base_parser, config_from_args, console, entry, write_atomic,
                                  write_json)
from safn_core.data.cohort import Cohort
from safn_core.data.contract import ContractReport, check_cohort
from safn_core.errors import SafnError


def print_load_report(cohort: Cohort) -> None:
    rep = cohort.report
    console.print(f"[bold]data:[/] {rep.source}")
    t = Table(title="participants found per cohort")
    t.add_column("cohort")
    t.add_column("found", justify="right")
    for name, n in rep.cohorts.items():
        t.add_row(str(name), str(n))
    console.print(t)
    if rep.excluded:
        t = Table(title="excluded")
        t.add_column("reason")
        t.add_column("participants", justify="right")
        for reason, n in rep.excluded.items():
            t.add_row(reason, str(n))
        console.print(t)
    counts = [int((cohort.y == k).sum()) for k in range(cohort.n_classes)]
    order = (1, 0) if cohort.n_classes == 2 else range(cohort.n_classes)  # binary: as before
    console.print(f"kept {len(cohort)} participants: "
                  + ", ".join(f"{counts[k]} {cohort.label_names[k]}" for k in order)
                  + (f" (target {cohort.target.name})" if cohort.target.name != "pd_vs_hc"
                     else ""))
    t = Table(title="modalities")
    for col in ("modality", "side", "features", "participants with data", "mean missing rate"):
        t.add_column(col, justify="left" if col in ("modality", "side") else "right")
    present = cohort.modality_present()
    for m in cohort.modalities:
        rate = cohort.table[list(m.features)].isna().mean().mean() if len(cohort) else 1.0
        t.add_row(m.name, m.side, str(len(m.features)), str(int(present[m.name].sum())),
                  f"{rate:.1%}")
    console.print(t)
    missing = {k: v for k, v in rep.missing_rate.items() if v > 0}
    if missing:
        worst = sorted(missing.items(), key=lambda kv: -kv[1])[:10]
        console.print("most missing features: " + ", ".join(f"{k} {v:.1%}" for k, v in worst))
    for note in rep.notes:
        console.print(f"note: {note}")


def print_site_classes(report: ContractReport, min_cell: int) -> None:
    """Participants per class at each site (several sites only); below min_cell in red."""
    if not report.site_class_counts:
        return
    t = Table(title=f"participants per class and site (min_cell = {min_cell})")
    t.add_column("site")
    for name in report.class_counts:
        t.add_column(name, justify="right")
    for site, per in report.site_class_counts.items():
        t.add_row(site, *(f"[red]{n}[/]" if n < min_cell else str(n) for n in per.values()))
    console.print(t)


def print_contract(report: ContractReport, min_cell: int) -> None:
    console.print(f"[bold]data contract[/] (min_cell = {min_cell}): "
                  + ("[green]passed[/]" if report.ok else "[red]failed[/]"))
    for p in report.problems:
        colour = "red" if p.severity == "fatal" else "yellow"
        console.print(f"  [{colour}]{p.severity}[/]: {p.describe()}", soft_wrap=True)


def run(argv: list[str] | None = None) -> int:
    parser = base_parser(
        "safn-check",
        "Check a site's data before it trains: load report (participants per cohort, "
        "exclusions, missingness) and the site data contract.")
    parser.add_argument("--data", metavar="PATH", type=Path,
                        help="a PPMI download folder, or a CSV/Parquet table (with --mapping); "
                             "default: data.path of the config, or the synthetic cohort")
    parser.add_argument("--mapping", metavar="YAML", type=Path,
                        help="column mapping for a table (data.mapping)")
    parser.add_argument("--export", metavar="FILE.csv", type=Path,
                        help="write the loaded participant table (one row per participant)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.mapping is not None:
        cfg.data.mapping = args.mapping
    if args.export is not None and args.export.exists():
        raise SafnError(f"--export {args.export}: file exists; nothing was overwritten. "
                        "Choose a new file name")
    from safn_core.data.sources import load_cohort, load_path

    cohort = load_path(args.data, cfg.data) if args.data else load_cohort(cfg.data, cfg.synth)
    print_load_report(cohort)
    report = check_cohort(cohort, cfg.data.min_cell)
    print_site_classes(report, cfg.data.min_cell)
    print_contract(report, cfg.data.min_cell)
    if args.out is not None:
        from safn_core.cli.common import fresh_output_dir

        out = fresh_output_dir(args.out)
        write_json(out / "load_report.json", cohort.report.to_dict())
        write_json(out / "contract.json", report.to_dict())
    if args.export is not None:
        write_atomic(args.export, cohort.export().to_csv(index=False))
        console.print(f"participant table written to {args.export}")
    report.raise_if_failed()
    return 0


main = entry(run)
