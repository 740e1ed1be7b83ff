"""Entry point of the `llmasos` command: subcommands, and errors shown as one clear line (no traceback)."""

from __future__ import annotations

import sys

import click

from llmasos import __version__


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


@cli.command()
@click.option("--model", "-m", required=True, help="Checkpoint directory.")
@click.option("--max-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.argument("prompt", nargs=-1, required=True)
def generate(model: str, max_tokens: int, temperature: float, seed: int | None, dtype: str, device: str,
             prompt: tuple[str, ...]) -> None:
    """Generate a continuation of PROMPT with a model."""
    from llmasos import LLM, SamplingParams

    llm = LLM.load(model, dtype=dtype, device=device)
    text = " ".join(prompt)
    output = llm.generate(text, SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed))[0]
    click.echo(text + output.text)


def main() -> None:
    cli(prog_name="llmasos")


if __name__ == "__main__":
    main()
