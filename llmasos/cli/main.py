"""Entry point of the `llmasos` command: subcommands, and errors shown as one clear line (no traceback)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from llmasos import __version__

# Each module defines `register(cli: click.Group)`; heavy imports (torch) happen inside the commands.
COMMAND_MODULES = ("generate", "library", "serve", "running", "keys", "database", "train", "evaluate", "run")


class CLIGroup(click.Group):
    """Turns LLMasOS errors and ValueErrors into `error: ...` and exit code 1 instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (ValueError, OSError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=CLIGroup)
@click.version_option(__version__, prog_name="llmasos")
def cli() -> None:
    """LLMasOS: get, run, serve, train and evaluate language models."""


for _name in COMMAND_MODULES:
    _module_name = f"llmasos.cli.{_name}"
    if importlib.util.find_spec(_module_name) is not None:
        importlib.import_module(_module_name).register(cli)


def main() -> None:
    cli(prog_name="llmasos")


if __name__ == "__main__":
    main()
