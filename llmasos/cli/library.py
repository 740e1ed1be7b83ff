"""`llmasos pull / import / list / show / rm / cp / create`: the model library commands (Ollama's verbs)."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _console():
    from llmasos.cli import table_console

    return table_console()


@click.command()
@click.argument("model")
@click.option("--name", default=None, help="Library name to store it under (default: the catalog name or repo name).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def pull(model: str, name: str | None, quiet: bool) -> None:
    """Download MODEL (a catalog name like qwen2.5:0.5b-instruct, or a Hub repo id owner/name[:revision])."""
    from llmasos.library.manage import human_count, human_size
    from llmasos.library.pull import pull as pull_model

    row, status = pull_model(model, name, show_progress=not quiet)
    if status == "up to date":
        click.echo(f"{row.name} is up to date ({row.source_text()})")
        return
    click.echo(f"{status} {row.name}: {row.family}, {human_count(row.num_parameters)} parameters, "
               f"{human_size(row.size_bytes)} ({row.source_text()})")


@click.command("import")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Library name, e.g. mymodel:v1 (lowercase letters, digits, . _ : -).")
@click.option("--link", is_flag=True, help="Hard-link the files instead of copying them (same filesystem only).")
@click.option("--base", default=None,
              help="For a LoRA adapter directory: the library model it was trained on (default: the one its "
                   "adapter_config.json names).")
def import_command(directory: Path, name: str, link: bool, base: str | None) -> None:
    """Validate the checkpoint in DIRECTORY and add it to the library as NAME. A PEFT LoRA adapter becomes a model
    derived from its base (FROM base + ADAPTER), served merged, or unmerged on the base with `serve --lora`."""
    from llmasos.library.importer import import_directory
    from llmasos.library.manage import human_count, human_size
    from llmasos.library.names import check_name

    check_name(name)
    row, linked = import_directory(directory, name, link=link, base=base)
    if row.adapter:
        click.echo(f"imported {row.name}: a LoRA adapter on {row.base_name} (serve it alone, or on its base with "
                   f"`llmasos serve --model {row.base_name} --lora {row.name}={row.name}`)")
        return
    how = "hard-linked" if linked else "copied"
    click.echo(f"imported {row.name}: {row.family}, {human_count(row.num_parameters)} parameters, "
               f"{human_size(row.size_bytes)} ({len(row.files)} files {how})")


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--available", is_flag=True, help="List the catalog of models `llmasos pull` knows by name.")
def list_command(as_json: bool, available: bool) -> None:
    """List the models in the library."""
    from rich.table import Table

    if available:
        from llmasos.library.catalog import CATALOG

        entries = [{"name": e.alias, "repo": e.repo_id, "family": e.family, "parameters": e.parameters,
                    "gated": e.gated} for e in CATALOG]
        if as_json:
            click.echo(json.dumps(entries, indent=2))
            return
        table = Table(box=None, header_style="bold")
        for column in ("NAME", "REPO", "FAMILY", "PARAMETERS", "GATED"):
            table.add_column(column, no_wrap=True)
        for e in entries:
            table.add_row(e["name"], e["repo"], e["family"], e["parameters"], "yes" if e["gated"] else "")
        _console().print(table)
        return

    from llmasos.library.manage import human_count, human_size, summary
    from llmasos.library.registry import list_models
    from llmasos.library.resolve import ensure_default_model

    ensure_default_model()
    rows = list_models()
    if as_json:
        click.echo(json.dumps([summary(row) for row in rows], indent=2))
        return
    if not rows:
        click.echo("no models yet: `llmasos pull qwen2.5:0.5b-instruct` fetches one, `llmasos import DIR --name NAME` "
                   "adds a local checkpoint, `llmasos list --available` shows the catalog")
        return
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "FAMILY", "PARAMETERS", "SIZE", "CONTEXT", "SOURCE"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(row.name, row.family, human_count(row.num_parameters), human_size(row.size_bytes),
                      str(row.context_length or "-"), row.source_text())
    _console().print(table)


@click.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--modelfile", is_flag=True, help="Print a Modelfile that recreates the model.")
def show(name: str, as_json: bool, modelfile: bool) -> None:
    """Show everything the library knows about NAME."""
    from llmasos.library.manage import details, human_count, human_size
    from llmasos.library.modelfile import render_modelfile
    from llmasos.library.names import check_name
    from llmasos.library.registry import require_model
    from llmasos.library.resolve import DEFAULT_MODEL_NAME, ensure_default_model

    check_name(name)
    if name == DEFAULT_MODEL_NAME:
        ensure_default_model()
    row = require_model(name)
    if modelfile:
        click.echo(render_modelfile(row), nl=False)
        return
    data = details(row)
    data.update(_quantization_details(row, Path(data["path"])))
    data["kv_cache_bytes_per_token"] = _kv_bytes_per_token(row, Path(data["path"]))
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    lines = [
        ("name", row.name), ("family", row.family), ("parameters", f"{human_count(row.num_parameters)} "
                                                                  f"({row.num_parameters:,})"),
        ("dtype", row.dtype or "-"), ("context", str(row.context_length or "-")),
        ("size", human_size(row.size_bytes)), ("source", row.source_text()), ("license", row.license or "-"),
        ("path", data["path"]),
    ]
    if row.adapter:
        lines.append(("adapter", row.adapter))
    quantization = data["quantization"]
    if quantization is not None:
        group = f", group size {quantization['group_size']}" if quantization["method"] == "int4" else ""
        lines.append(("quantized", f"{quantization['method']}{group} (output head int8)"))
    if data["weight_bytes"] is not None:
        lines.append(("weights", f"{human_size(data['weight_bytes'])} ({data['weight_bytes']:,} bytes of tensors)"))
    per_token = data["kv_cache_bytes_per_token"]
    if per_token:
        full = f", {human_size(per_token * row.context_length)} at the full context" if row.context_length else ""
        lines.append(("kv cache", f"{human_size(per_token)} per token{full}"))
    for key, value in lines:
        click.echo(f"{key:<12}{value}")
    if row.system:
        click.echo(f"{'system':<12}{row.system}")
    if row.parameters:
        click.echo(f"{'defaults':<12}{json.dumps(row.parameters)}")
    template = "overridden (see --json)" if row.chat_template else ("from the checkpoint" if
                                                                    data["effective_chat_template"] else "none")
    click.echo(f"{'template':<12}{template}")
    click.echo("files")
    for entry in row.files:
        click.echo(f"  {entry['path']:<40} {human_size(entry['size']):>10}  sha256:{entry['sha256'][:16]}")


@click.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Remove even a model that a running server holds.")
def rm(names: tuple[str, ...], force: bool) -> None:
    """Remove models from the library (files shared with other models stay). A model that a running server of this
    home holds is refused (stop it there first: `llmasos stop NAME`) unless --force."""
    from llmasos.library.manage import human_size, remove_model
    from llmasos.library.names import check_name
    from llmasos.server.registry import servers_holding

    for name in names:
        check_name(name)
        holders = [] if force else servers_holding(name)
        if holders:
            where = ", ".join(f"{entry['url']} (pid {entry['pid']})" for entry in holders)
            raise click.ClickException(f"{name!r} is loaded by the running server at {where}: unload it there "
                                       f"first (`llmasos stop {name}`), or pass --force")
    for name in names:
        freed = remove_model(name)
        click.echo(f"removed {name}" + (f" (freed {human_size(freed)})" if freed else ""))


@click.command()
@click.argument("source")
@click.argument("target")
def cp(source: str, target: str) -> None:
    """Copy SOURCE to a new name TARGET (the files are shared, not duplicated)."""
    from llmasos.library.manage import copy_model

    copy_model(source, target)
    click.echo(f"copied {source} to {target}")


@click.command()
@click.argument("name")
@click.option("--file", "-f", "modelfile", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The Modelfile (FROM, SYSTEM, PARAMETER, TEMPLATE, ADAPTER, LICENSE).")
def create(name: str, modelfile: Path) -> None:
    """Create NAME from a Modelfile: a base model plus a system prompt, default parameters, template or adapter.
    `PARAMETER quantization int8|int4` stores the weights quantized (a new checkpoint, loaded fast)."""
    from llmasos.library.modelfile import MAX_MODELFILE_BYTES, create_model
    from llmasos.library.names import check_name

    check_name(name)
    if modelfile.stat().st_size > MAX_MODELFILE_BYTES:
        raise ValueError(f"{modelfile} is larger than 1 MiB; a Modelfile is a short text file")
    try:
        text = modelfile.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{modelfile} is not UTF-8 text") from None
    row = create_model(name, text, relative_to=modelfile.resolve().parent)
    from llmasos.library.quantized import quantized_from_base

    quantized = quantized_from_base(row)
    if quantized is None:
        click.echo(f"created {row.name} from {row.base_name}")
        return
    method, group_size = quantized
    from llmasos.library.manage import human_size

    shown = method if method == "int8" else f"int4, group size {group_size}"
    click.echo(f"created {row.name} from {row.base_name}: weights quantized to {shown}, {human_size(row.size_bytes)}")


def _kv_bytes_per_token(row, path: Path) -> int | None:
    """KV-cache bytes one token takes when served (keys and values of every layer, in the activation dtype)."""
    import torch

    from llmasos.engine.kv_cache import bytes_per_block
    from llmasos.errors import ModelLoadError
    from llmasos.models.loader import read_config

    try:
        config = read_config(path)
    except (ModelLoadError, ValueError, KeyError):
        return None  # an encoder or seq2seq model, or a checkpoint we cannot read: no decoder KV cache to show
    dtype = getattr(torch, str(row.dtype or "bfloat16").removeprefix("torch."), None)
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16
    return bytes_per_block(config, 1, dtype)


def _quantization_details(row, path: Path) -> dict:
    """`show`'s quantization (method and group size, or None) and the checkpoint's tensor bytes."""
    from llmasos.library.quantized import checkpoint_quantization, weight_bytes

    quantization = checkpoint_quantization(path) if path.is_dir() else None
    return {"quantization": None if quantization is None else {"method": quantization[0],
                                                               "group_size": quantization[1]},
            "weight_bytes": weight_bytes(path, row.files or []) if path.is_dir() else None}


def register(cli: click.Group) -> None:
    for command in (pull, import_command, list_command, show, rm, cp, create):
        cli.add_command(command)
