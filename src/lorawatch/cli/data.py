"""`lorawatch data fetch` and `lorawatch data list`: the paper's datasets."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lorawatch.cli.common import Terminated, fail
from lorawatch.errors import UserError

data_app = typer.Typer(no_args_is_help=True, help="The paper's datasets: download them, see where they are.")


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="dataset name, e.g. trace-500 (see `lorawatch data list`)")],
    dest: Annotated[Optional[Path], typer.Option(help="target folder (default: $LORAWATCH_DATA/<name>, "
                                                      "else ~/.local/share/lorawatch/data/<name>)")] = None,
    source: Annotated[Optional[str], typer.Option(help="a local folder or a base URL (http://, https://, file://) "
                                                       "instead of the authors' repository")] = None,
    timeout: Annotated[float, typer.Option(help="seconds per request")] = 30.0,
) -> None:
    """Download a dataset, verifying every file's SHA-256; files already there are not downloaded again.

    Progress goes to stderr; the dataset's folder is printed on stdout.
    """
    from lorawatch.data.fetch import fetch_dataset

    try:
        folder = fetch_dataset(name, dest, source, timeout=timeout,
                               log=lambda line: print(line, file=sys.stderr, flush=True))
    except UserError as error:
        fail(str(error))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: verified files are kept; run the same command again to finish\n")
        raise typer.Exit(130)
    except Terminated:  # SIGTERM (a scheduler's preemption, `kill`): as Ctrl-C, with the code `run` gives it
        sys.stderr.write("terminated (SIGTERM): verified files are kept; run the same command again to finish\n")
        raise typer.Exit(143)
    print(folder)


@data_app.command("list")
def data_list() -> None:
    """The known datasets, and whether and where each is installed."""
    from lorawatch.data.fetch import DATASETS, dataset_dir, human_size, verified_files

    for name, spec in DATASETS.items():
        folder = dataset_dir(name)
        count = verified_files(name)
        if count == len(spec.files):
            state = f"installed in {folder}"
        elif count:
            state = f"incomplete ({count} of {len(spec.files)} files verified) in {folder}"
        else:
            state = f"not installed (would go to {folder})"
        print(f"{name}: {state}")
        print(f"    {spec.description}; {len(spec.files)} files, {human_size(spec.total_size)}")
        print(f"    from {spec.repository}@{spec.commit[:12]} {spec.folder}")
