"""What every ``loom`` command shares: the stderr console and ``run``, which
maps loom's errors to the exit codes of ARCHITECTURE.md (2 bad input, 3 no
feasible layout) with a one-line message. The subcommands import this
module; nothing here imports a subcommand."""

from __future__ import annotations

from typing import Callable

import typer
from rich.console import Console
from rich.markup import escape

from loom.planner.specs.errors import InfeasibleError, SpecError

err = Console(stderr=True, highlight=False)


def run(action: Callable[[], None]) -> None:
    """Run a command's ``action``, mapping loom's errors to exit codes."""
    try:
        action()
    except SpecError as error:
        err.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(2) from None
    except InfeasibleError as error:
        err.print(f"[red]infeasible:[/red] {escape(str(error))}")
        raise typer.Exit(3) from None
