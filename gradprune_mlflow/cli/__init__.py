"""The `gradprune` command: a thin Typer app over the library.

Every sub-command lives in its own module here and exposes `register(app)`; add it to COMMANDS below. Errors are
handled in one place, `GradpruneGroup.main`: each non-zero exit prints exactly one line on stderr, and a traceback
only with GRADPRUNE_DEBUG=1.

Exit codes: 0 done; 2 bad input; 3 model file refused as unsafe; 1 internal error (docs/contracts.md, "Exit codes").
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperGroup

try:  # recent typer releases carry their own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # older typer runs on click itself
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from gradprune_mlflow.errors import GradpruneError

# Sub-command modules, in help order. Each must import: a missing or broken one stops the CLI with an error naming it.
COMMANDS = [
    "sanitize",
    "dataset",   # gradprune dataset pack|push|validate
    "scan",      # gradprune scan
    "webhook",   # gradprune webhook serve|register
    "serve",     # gradprune serve
    "demo",      # gradprune demo
]

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_UNSAFE, EXIT_NEEDS_REVIEW = 0, 1, 2, 3, 4


def _say(line: str) -> None:
    """Print one line on stderr; embedded newlines are folded so the line stays one line."""
    print(" ".join(str(line).split()), file=sys.stderr, flush=True)


def _debug() -> bool:
    return os.environ.get("GRADPRUNE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def run_guarded(call: Callable[[], Any]) -> int:
    """Run a click entry point and turn whatever it raises into an exit code and one line on stderr."""
    try:
        rv = call()
        return rv if isinstance(rv, int) else EXIT_OK
    except NoArgsIsHelpError as exc:
        print(exc.ctx.get_help())
        return EXIT_OK
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "gradprune"
        _say(f"error: {exc.format_message().replace('Value error, ', '')} (see `{where} --help`)")
        return EXIT_BAD_INPUT
    except ClickException as exc:
        _say(f"error: {exc.format_message()}")
        return exc.exit_code if exc.exit_code else EXIT_BAD_INPUT
    except typer.Abort:
        _say("error: aborted")
        return EXIT_INTERNAL
    except GradpruneError as exc:
        if _debug():
            traceback.print_exc()
        _say(f"error: {exc.message}")
        return exc.exit_code
    except Exception as exc:
        if _debug():
            traceback.print_exc()
        _say(f"internal error: {type(exc).__name__}: {exc}; rerun with GRADPRUNE_DEBUG=1 for the traceback")
        return EXIT_INTERNAL


class GradpruneGroup(TyperGroup):
    """The top-level click group: runs sub-commands under `run_guarded` (also under typer's CliRunner)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        code = run_guarded(
            lambda: super(GradpruneGroup, self).main(args, prog_name, complete_var, standalone_mode=False, **extra)
        )
        if code == 130:
            _say("error: interrupted")
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=GradpruneGroup,
    name="gradprune",
    help="Remove backdoors from CNNs in the MLflow Model Registry with Grad-Prune.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Remove backdoors from CNNs in the MLflow Model Registry with Grad-Prune."""
    # A callback makes `gradprune` a group even while it has a single sub-command.


def _register_all() -> None:
    for name in COMMANDS:
        module_name = f"{__name__}.{name}"
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            # A silently missing sub-command would only show as "No such command" far from its cause.
            raise ImportError(f"gradprune sub-command module {module_name} does not import: {exc}") from exc
        module.register(app)


_register_all()
