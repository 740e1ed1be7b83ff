"""Entry point of the `llmasos` command: subcommands, and errors shown as one clear line (no traceback)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from llmasos import __version__
from llmasos.errors import LLMasOSError

# Each module defines `register(cli: click.Group)`; heavy imports (torch) happen inside the commands.
COMMAND_MODULES = ("generate", "library", "serve", "running", "keys", "database", "train", "evaluate", "run", "index")


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
        except BrokenPipeError:  # `llmasos show X | head -1`: the reader left; click ends quietly (status 1)
            raise
        except (LLMasOSError, ValueError, OSError) as exc:
            click.echo(f"error: {_describe(exc)}", err=True)
            sys.exit(1)
        except Exception as exc:
            message = _storage_error(exc)
            if message is None:
                raise
            click.echo(f"error: {message}", err=True)
            sys.exit(1)


def _describe(exc: BaseException) -> str:
    import errno

    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        if exc.strerror and "free" in exc.strerror:  # ours: it names what, where and how much is free
            return exc.strerror
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"the disk is full{where}: free some space and run the command again"
    return str(exc)


def _storage_error(exc: BaseException) -> str | None:
    """One line for the database's and safetensors' errors (a full disk, a locked or unreachable database)."""
    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # pragma: no cover - a dependency
        SQLAlchemyError = ()  # noqa: N806
    if SQLAlchemyError and isinstance(exc, SQLAlchemyError):
        from llmasos.db import database_url

        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        url = database_url()
        shown = url if url.startswith("sqlite") else url.split("@")[-1]  # never a password
        if url.startswith("sqlite:///"):
            import shutil
            from pathlib import Path

            free = shutil.disk_usage(Path(url.removeprefix("sqlite:///")).parent).free
            if free < (1 << 20):
                reason += f"; the disk holding it is full ({free // 1024} KB free): free some space"
        return f"the database ({shown}) failed: {reason}"
    if type(exc).__name__ == "SafetensorError":
        return f"writing or reading weights failed: {exc} (is the disk full?)"
    return None


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
