"""`llmasos index create|add|delete|query|list|rm`: semantic indexes of documents, embedded by a library model."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

import click

CHUNK_OPTIONS = [
    click.option("--chunk-size", type=click.IntRange(min=1), default=None,
                 help="Chunk length in --chunk-unit units (default: what the model reads, or 1000 characters)."),
    click.option("--chunk-overlap", type=click.IntRange(min=0), default=None,
                 help="Units shared by neighbouring chunks (default: 32 tokens, or 200 characters)."),
    click.option("--chunk-unit", type=click.Choice(["tokens", "chars"]), default="tokens", show_default=True),
]


def _chunk_options(function):
    for option in reversed(CHUNK_OPTIONS):
        function = option(function)
    return function


@click.group()
def index() -> None:
    """Semantic search: index documents with an embedding model and query them by meaning."""


@contextmanager
def _embedding_progress(quiet: bool):
    """A rich progress bar on stderr for the chunks being embedded (shown once there are more than a few)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("embedding chunks"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), disable=quiet, transient=False)
    task = None

    def report(done: int, total: int) -> None:
        nonlocal task
        if total < 64:
            return
        if task is None:
            progress.start()
            task = progress.add_task("embed", total=total)
        progress.update(task, completed=done)

    try:
        yield report
    finally:
        progress.stop()


def _note_cut(index) -> None:
    if index.num_cut:
        limit = index.embedder.max_seq_length
        click.echo(f"note: {index.num_cut} chunks are longer than the model reads ({limit} tokens with its special "
                   "tokens) and were embedded from their start only: use --chunk-unit tokens, or a smaller "
                   "--chunk-size", err=True)


def _threads() -> None:
    """Torch threads chosen from the cores other processes leave free (llmasos/threads.py), not inherited."""
    import torch

    from llmasos.threads import choose_num_threads, explicit_num_threads

    torch.set_num_threads(choose_num_threads(explicit_num_threads()))


@index.command("create")
@click.argument("name")
@click.option("--model", required=True, help="Embedding model: a library name or a directory.")
@click.option("--data", required=True, multiple=True,
              help="A .jsonl file of {\"text\": ..., \"id\": ...} records, a text file or a directory (repeatable).")
@_chunk_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def create(name, model, data, chunk_size, chunk_overlap, chunk_unit, quiet) -> None:
    """Create index NAME from the documents in --data."""
    from llmasos.search import Chunking, SemanticIndex

    chunking = Chunking(chunk_unit, chunk_size, chunk_overlap)
    _threads()
    with _embedding_progress(quiet) as progress:
        created = SemanticIndex.create(name, model=model, data=data, chunking=chunking, progress=progress)
    click.echo(f"created index {name!r}: {created.num_chunks} chunks of {created.manifest['num_documents']} "
               f"documents, {created.dimension}-dimensional vectors from {created.model}")
    _note_cut(created)


@index.command("add")
@click.argument("name")
@click.option("--data", required=True, multiple=True, help="A .jsonl file, a text file or a directory, as for create.")
@click.option("--model", default=None, help="Check that this is the index's model (refused otherwise).")
@click.option("--replace", is_flag=True, help="Documents already in the index are replaced, not refused.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def add(name, data, model, replace, quiet) -> None:
    """Add the documents in --data to index NAME."""
    from llmasos.search import SemanticIndex
    from llmasos.search.index import load_embedder

    opened = SemanticIndex.open(name)
    _threads()
    if model is not None:
        embedder = load_embedder(model)
        opened.check_embedder(embedder, adding=True, model_name=model)
        opened = SemanticIndex.open(name, embedder=embedder)
    with _embedding_progress(quiet) as progress:
        added = opened.add(data=data, replace=replace, progress=progress)
    click.echo(f"added {len(added)} chunks to index {name!r} ({opened.num_chunks} in all)")
    _note_cut(opened)


@index.command("delete")
@click.argument("name")
@click.option("--ids", default=None, help="Comma-separated chunk or document ids.")
@click.option("--source", default=None, help="A source file (or directory) whose chunks go.")
def delete(name, ids, source) -> None:
    """Delete chunks from index NAME, by id or by source file."""
    from llmasos.search import SemanticIndex

    id_list = [value.strip() for value in ids.split(",") if value.strip()] if ids else []
    opened = SemanticIndex.open(name)
    removed = opened.delete(id_list, source=source)
    click.echo(f"deleted {removed} chunks from index {name!r} ({opened.num_chunks} left)")


@index.command("query")
@click.argument("name")
@click.argument("text")
@click.option("-k", "--top-k", "k", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: {index, model, query, data: [hits]}.")
def query(name, text, k, as_json) -> None:
    """The K chunks of index NAME most similar in meaning to TEXT."""
    from llmasos.search import SemanticIndex

    opened = SemanticIndex.open(name)
    _threads()
    hits = opened.query(text, k)
    if as_json:
        click.echo(json.dumps({"index": name, "model": opened.model, "query": text,
                               "data": [hit.to_dict() for hit in hits]}, ensure_ascii=False))
        return
    from rich.table import Table

    from llmasos.cli import table_console

    table = Table("#", "score", "id", "text", "source", title=f"{name}: {text}", show_lines=True)
    for rank, hit in enumerate(hits, start=1):
        where = hit.metadata.get("source")
        if where and hit.metadata.get("line") is not None:
            where = f"{where}:{hit.metadata['line']}"
        shown = " ".join(hit.text.split())
        table.add_row(str(rank), f"{hit.score:.4f}", hit.id, shown if len(shown) <= 300 else shown[:297] + "...",
                      where or "-")
    table_console().print(table)
    if not hits:
        click.echo("(the index is empty)", err=True)


@index.command("list")
@click.option("--json", "as_json", is_flag=True)
def list_(as_json) -> None:
    """Indexes: name, model, dimensions, chunks, size."""
    from llmasos.search.store import list_indexes

    rows = list_indexes()
    if as_json:
        click.echo(json.dumps(rows))
        return
    from rich.table import Table

    from llmasos.cli import table_console

    table = Table("name", "model", "dims", "chunks", "documents", "size", "updated")
    for row in rows:
        table.add_row(row["name"], row["model"], str(row["dimension"]), str(row["chunks"]), str(row["documents"]),
                      _size(row["size_bytes"]), row["updated"])
    table_console().print(table)
    if not rows:
        print("no indexes yet: create one with `llmasos index create NAME --model MODEL --data FILE`",
              file=sys.stderr)


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return ""


@index.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def show(name, as_json) -> None:
    """Index NAME's manifest: model, dimension, chunking, vector-search settings, counts, where it lives."""
    from llmasos.search.store import directory_size, index_directory, read_manifest

    manifest = read_manifest(name)
    details = {**manifest, "path": str(index_directory(name)), "size_bytes": directory_size(index_directory(name))}
    if as_json:
        click.echo(json.dumps(details))
        return
    from rich.table import Table

    from llmasos.cli import table_console

    graph = manifest["graph"]
    if graph["exact"]:
        search = "exact scan (no HNSW search breadth reached the recall target)"
    elif manifest["num_chunks"] < graph["exact_below"]:
        search = f"exact scan (under {graph['exact_below']:,} chunks)"
    else:
        search = (f"HNSW, M={graph['connectivity']}, ef={graph['expansion_search']} (measured recall@10 "
                  f"{graph['measured_recall']})")
    chunking = manifest["chunking"]
    table = Table("", "", show_header=False)
    for label, value in (("model", manifest["model"]), ("dimension", str(manifest["dimension"])),
                         ("chunks", str(manifest["num_chunks"])), ("documents", str(manifest["num_documents"])),
                         ("chunking", f"{chunking['size']} {chunking['unit']}, overlap {chunking['overlap']}"),
                         ("search", search), ("size", _size(details["size_bytes"])), ("path", details["path"]),
                         ("created", manifest["created"]), ("updated", manifest["updated"])):
        table.add_row(label, value)
    table_console().print(table)


@index.command("rm")
@click.argument("name")
def rm(name) -> None:
    """Remove index NAME (its vectors, chunks and manifest)."""
    from llmasos.search.store import remove_index

    remove_index(name)
    click.echo(f"removed index {name!r}")


def register(cli: click.Group) -> None:
    cli.add_command(index)
