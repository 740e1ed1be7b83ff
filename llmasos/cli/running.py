"""`llmasos ps`, `llmasos load MODEL`, `llmasos stop MODEL`: the models a running server holds, as `ollama ps` and
`ollama stop` show and change them. They talk to the server at --url (LLMASOS_BASE_URL, else
http://127.0.0.1:8000) with LLMASOS_API_KEY when keys are on."""

from __future__ import annotations

import datetime as dt
import json

import click

URL_HELP = "The server (default: $LLMASOS_BASE_URL, else http://127.0.0.1:8000)."


def _client(url: str | None):
    from llmasos.client import Client

    return Client(url, timeout=3600.0)


def _call(url: str | None, method: str, *args):
    """Call the server; its errors and an unreachable server are one `error:` line (as every command's) and exit
    status 1."""
    from llmasos.client import APIConnectionError, APIError
    from llmasos.errors import EndpointError

    with _client(url) as client:
        try:
            return getattr(client, method)(*args)
        except APIConnectionError:
            raise EndpointError(f"cannot reach a server at {client.base_url}: is `llmasos serve` running "
                                       "(or --url / LLMASOS_BASE_URL wrong)?") from None
        except APIError as exc:
            raise EndpointError(exc.message) from None


def _until(entry: dict) -> str:
    if entry["state"] != "loaded":
        return entry["state"]
    if entry["stopping"]:
        return "stopping"
    if entry["in_flight"]:
        return "in use"
    if entry["expires_at"] is None:
        return "forever"
    left = (dt.datetime.fromisoformat(entry["expires_at"]) - dt.datetime.now(dt.timezone.utc)).total_seconds()
    if left < 60:
        return f"{max(0, round(left))} seconds from now"
    minutes = round(left / 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''} from now" if minutes < 120 else \
        f"{round(left / 3600)} hours from now"


@click.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
def ps(url, as_json) -> None:
    """List the models a running server holds: size, device, requests in flight, and until when."""
    models = _call(url, "ps")
    if as_json:
        click.echo(json.dumps(models, indent=2))
        return
    from rich.table import Table

    from llmasos.cli import table_console
    from llmasos.library.manage import human_size

    table = Table(box=None, header_style="bold")
    for column in ("NAME", "SIZE", "DEVICE", "IN FLIGHT", "UNTIL"):
        table.add_column(column)
    for entry in models:
        table.add_row(entry["name"], human_size(entry["size"]), entry["device"] or "-",
                      str(entry["in_flight"]), _until(entry))
    table_console().print(table)


@click.command()
@click.argument("model")
@click.option("--keep-alive", default=None,
              help="How long it stays loaded after its last request: seconds, '10m', '1h', or -1 until stopped "
                   "(default: the server's).")
@click.option("--url", default=None, help=URL_HELP)
def load(model, keep_alive, url) -> None:
    """Load MODEL in a running server now, so that its first request does not wait."""
    from llmasos.library.manage import human_size

    entry = _call(url, "load", model, keep_alive)
    click.echo(f"{entry['name']} loaded on {entry['device']} ({human_size(entry['size'])}), until {_until(entry)}")


@click.command()
@click.argument("model")
@click.option("--url", default=None, help=URL_HELP)
def stop(model, url) -> None:
    """Unload MODEL from a running server (once its requests in flight are done); the next request loads it again."""
    answer = _call(url, "stop", model)
    if answer["status"] == "unloaded":
        click.echo(f"{model} unloaded")
    else:
        click.echo(f"{model} unloads when its {answer['in_flight']} request(s) in flight are done")


def register(cli: click.Group) -> None:
    for command in (ps, load, stop):
        cli.add_command(command)
