"""What every ``loom`` command shares: the stderr console and ``run``, which
maps loom's errors to the exit codes of ARCHITECTURE.md with a one-line
message: 2 bad input, 3 no feasible layout, 4 an internal error (never 1,
which means a failed gate). The subcommands import this module; nothing
here imports a subcommand."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from typer._click.exceptions import MissingParameter  # typer vendors click (0.29: not re-exported)
from typer.core import TyperGroup
from rich.markup import escape

from loom.planner.output.files import check_out_folder, check_writable
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


def _quiet_stdout() -> None:
    """Send the rest of stdout nowhere: its reader has gone (the pattern the
    Python docs give for SIGPIPE)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class StdoutConsole(Console):
    """A stdout console its reader may close (``loom plan | head``): the rest
    of the table goes nowhere and the command goes on to write its files
    and check its gates, where rich would exit 1 (the failed-gate code)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _quiet_stdout()


@contextmanager
def stdout_may_close() -> Iterator[None]:
    """Print to stdout that its reader may close, as StdoutConsole does."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()


def check_output(path: Optional[Path], flag: str = "--out", *, folder: bool = True) -> None:
    """Before any work: an output ``folder`` (a set of files loom may
    replace, see check_out_folder) or file at ``path`` can be written, or bad
    input naming ``flag``; any OSError on the way (/proc/x, /sys/x, a name too
    long, no permission) too. Nothing is created. None: no output asked for."""
    if path is None:
        return
    path = Path(path)
    try:
        if folder:
            check_out_folder(path, flag)
        elif path.is_dir():
            raise SpecError(flag, flag.lstrip("-"), "a file name (it is a folder)", str(path))
        check_writable(path, flag)
    except OSError as error:
        what = "a folder" if folder else "a file"
        raise SpecError(flag, flag.lstrip("-"), f"{what} loom can write ({error.strerror or error})", str(path)) from None


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
                where = getattr(getattr(error, "ctx", None), "command_path", None) or self._command_path(args)
                err.print(f"[red]error:[/red] {escape(_flag_first(error, message))} (see {escape(where)} --help)")
            code = getattr(error, "exit_code", 2)
        except typer.Abort:
            err.print("aborted")
            code = 130
        if not standalone_mode:
            return code
        raise SystemExit(code or 0)

    def _command_path(self, args: list[str] | None) -> str:
        """The (sub)command the words of ``args`` name, for errors click
        raises before it has entered that command (``loom plan --top-k``)."""
        words, group = ["loom"], self
        for arg in sys.argv[1:] if args is None else args:
            command = group.commands.get(arg) if hasattr(group, "commands") else None
            if command is None:
                break
            words.append(arg)
            group = command
        return " ".join(words)


def _flag_first(error: typer.TyperException, message: str) -> str:
    """A value the flag's type refused, said the way loom's own errors are:
    ``--tp: expected a valid integer`` rather than ``Invalid value for
    '--tp': Input should be a valid integer``; a missing one as
    ``--out: expected a value (it is required)``."""
    param = getattr(error, "param", None)
    if not isinstance(error, typer.BadParameter) or param is None or not param.opts:
        return message
    name = param.opts[0] if param.param_type_name == "option" else param.name.upper()  # an argument as --help shows it
    if isinstance(error, MissingParameter):  # its message is empty: click words it in format_message
        return f"{name}: expected {'a value' if param.param_type_name == 'option' else 'an argument'} (it is required)"
    said = error.message
    if not said:
        return message
    return f"{name}: " + ("expected " + said.removeprefix("Input should be ") if said.startswith("Input should be ") else said)
