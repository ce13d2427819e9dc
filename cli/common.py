"""What every ``loom`` command shares: the stderr console and ``run``, which
maps loom's errors to the exit codes of ARCHITECTURE.md with a one-line
message: 2 bad input, 3 no feasible layout, 4 an internal error (never 1,
which means a failed gate). The subcommands import this module; nothing
here imports a subcommand."""

from __future__ import annotations

import os
import traceback
from typing import Callable

import typer
from rich.console import Console
from typer.core import TyperGroup
from rich.markup import escape

from loom.planner.specs.errors import INTERNAL_ERROR_EXIT_CODE, InfeasibleError, SpecError

err = Console(stderr=True, highlight=False, soft_wrap=True)


def run(action: Callable[[], None]) -> None:
    """Run a command's ``action``, mapping loom's errors to exit codes. Any
    other exception is a bug in loom: one line asking for a report (the
    traceback only with LOOM_DEBUG=1), exit 4."""
    try:
        action()
    except SpecError as error:
        err.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(2) from None
    except InfeasibleError as error:
        err.print(f"[red]infeasible:[/red] {escape(str(error))}")
        raise typer.Exit(3) from None
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as error:  # noqa: BLE001 (the whole point: no traceback, a distinct code)
        if os.environ.get("LOOM_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        where = "".join(traceback.format_exception_only(type(error), error)).strip().splitlines()[-1]
        err.print(f"[red]internal error:[/red] {escape(where)}. This is a bug in loom: please report it to its maintainers "
                  "with the command and its input files (LOOM_DEBUG=1 prints the traceback)")
        raise typer.Exit(INTERNAL_ERROR_EXIT_CODE) from None



class OneLineErrors(TyperGroup):
    """The ``loom`` group, whose command-line errors (an unknown flag, a value
    that does not parse) are one line naming the flag, exit 2, like loom's
    own bad-input errors, instead of click's usage block; a group called
    without a command still prints its help."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as error:  # click's ClickException: usage and parameter errors
            message = error.format_message()
            if "\n" in message:  # the help of a group called without a command
                err.print(escape(message))
            else:
                where = getattr(getattr(error, "ctx", None), "command_path", "loom")
                err.print(f"[red]error:[/red] {escape(_flag_first(error, message))} (see {escape(where)} --help)")
            code = getattr(error, "exit_code", 2)
        except typer.Abort:
            err.print("aborted")
            code = 130
        if not standalone_mode:
            return code
        raise SystemExit(code or 0)


def _flag_first(error: typer.TyperException, message: str) -> str:
    """A value the flag's type refused, said the way loom's own errors are:
    ``--tp: expected a valid integer`` rather than ``Invalid value for
    '--tp': Input should be a valid integer``."""
    param = getattr(error, "param", None)
    if not isinstance(error, typer.BadParameter) or param is None or not param.opts:
        return message
    said = error.message
    return f"{param.opts[0]}: " + ("expected " + said.removeprefix("Input should be ") if said.startswith("Input should be ") else said)
