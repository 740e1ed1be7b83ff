"""`llmasos generate`: one completion from a model, printed."""

from __future__ import annotations

import click


@click.command()
@click.option("--model", "-m", required=True, help="Library name or checkpoint directory.")
@click.option("--max-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--dtype", default="auto", show_default=True,
              help="float32, bfloat16, float16; auto: the checkpoint's, float32 ones in bfloat16 where supported.")
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda, cuda:1, ...; auto: a CUDA GPU when there is one, else the CPU.")
@click.argument("prompt", nargs=-1, required=True)
def generate(model: str, max_tokens: int, temperature: float, seed: int | None, dtype: str, device: str,
             prompt: tuple[str, ...]) -> None:
    """Generate a continuation of PROMPT."""
    from llmasos import LLM, SamplingParams

    llm = LLM.load(model, dtype=dtype, device=device)
    text = " ".join(prompt)
    output = llm.generate(text, SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed))[0]
    click.echo(text + output.text)


def register(cli: click.Group) -> None:
    cli.add_command(generate)
