"""``safn-export-mlflow BUNDLE DIR``: a model bundle as an MLflow pyfunc model folder.

Its own command, not a flag of safn-validate: exporting needs a bundle only, no site data, and
safn-validate requires data (``--data`` / ``--site``). The work is
`safn_core.mlflow_model.save_mlflow_model`; MLflow is needed (``pip install -e '.[tracking]'``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape

from safn_core.cli.common import console, entry, err_console
from safn_core.errors import SafnError


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="safn-export-mlflow",
        description="Write a model bundle as an MLflow model (pyfunc flavour): "
                    "mlflow.pyfunc.load_model(DIR).predict(frame) gives the probabilities "
                    "safn-validate computes; `mlflow models serve -m DIR` serves it.")
    parser.add_argument("bundle", metavar="BUNDLE", type=Path, help="the bundle folder "
                        "(a run's model/, or a site bundle)")
    parser.add_argument("dest", metavar="DIR", type=Path, help="the MLflow model folder to "
                        "write (must not exist)")
    args = parser.parse_args(argv)
    from safn_core.mlflow_model import require_mlflow, save_mlflow_model

    try:
        require_mlflow()
    except SafnError as exc:  # its message holds '.[tracking]', which is not console markup
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return exc.exit_code

    path = save_mlflow_model(args.bundle, args.dest)
    console.print(f"MLflow model written to {path} (the bundle {args.bundle} is unchanged); "
                  f"load it with mlflow.pyfunc.load_model('{path}')")
    return 0


main = entry(run)
