"""The ``onnxsvd`` group and its entry point: every command registered explicitly, errors as one line.

Errors are one line on stderr (``onnxsvd: error: …``) with exit code 2 for usage errors and 1 otherwise
(3 for a failed ``validate`` gate); ``--debug`` anywhere on the line shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import click

from onnxsvd.cli.calibrate import calibrate_command
from onnxsvd.cli.extract import extract_command
from onnxsvd.cli.finetune import finetune_command
from onnxsvd.cli.inspect import inspect_command
from onnxsvd.cli.rewrite import rewrite_command
from onnxsvd.cli.sweep import sweep_command
from onnxsvd.cli.validate import validate_command
from onnxsvd.errors import OnnxSvdError

__all__ = ["COMMANDS", "cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="onnxsvd")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors (allowed anywhere).")
def cli(verbose: int, debug: bool) -> None:
    """Shrink ONNX models: replace constant-weight MatMul/Gemm layers by SVD low-rank factor chains."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


#: Every command, in the order ``--help`` lists them.
COMMANDS = (
    inspect_command,
    calibrate_command,
    rewrite_command,
    validate_command,
    sweep_command,
    finetune_command,
    extract_command,
)
for _command in COMMANDS:
    cli.add_command(_command)


def _one_line(message: str) -> str:
    return " ".join(message.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``onnxsvd`` script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args = [arg for arg in args if arg != "--debug"]
        args.insert(0, "--debug")
    if not [arg for arg in args if arg != "--debug"]:
        with click.Context(cli, info_name="onnxsvd", **cli.context_settings) as context:
            click.echo(cli.get_help(context))
        return 0
    try:
        cli.main(args=args, prog_name="onnxsvd", standalone_mode=False)
    except click.exceptions.Exit as done:
        return int(done.exit_code)
    except click.UsageError as error:
        if debug:
            raise
        hint = f" (see '{error.ctx.command_path} --help')" if error.ctx is not None else ""
        click.echo(f"onnxsvd: error: {_one_line(error.format_message())}{hint}", err=True)
        return 2
    except click.Abort:
        click.echo("onnxsvd: aborted", err=True)
        return 130
    except OnnxSvdError as error:
        if debug:
            raise
        click.echo(f"onnxsvd: error: {_one_line(str(error))}", err=True)
        return error.exit_code
    except KeyboardInterrupt:
        click.echo("onnxsvd: interrupted", err=True)
        return 130
    except Exception as error:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        click.echo(
            f"onnxsvd: internal error: {type(error).__name__}: {_one_line(str(error))} "
            "(re-run with --debug for the traceback and report it)",
            err=True,
        )
        return 1
    return 0
