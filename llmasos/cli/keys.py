"""`llmasos keys create|list|revoke` and `llmasos usage`: API keys and metered usage in the database."""

from __future__ import annotations

import datetime as dt
import json

import click


def _date(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM") from None


@click.group()
def keys() -> None:
    """Manage API keys (stored hashed; a key is shown once, when created)."""


@keys.command("create")
@click.option("--name", required=True)
@click.option("--token-quota", type=click.IntRange(min=1), default=None, help="Total tokens this key may use.")
@click.option("--rpm", type=click.IntRange(min=1), default=None, help="Requests per minute.")
@click.option("--tpm", type=click.IntRange(min=1), default=None, help="Tokens per minute.")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=None)
@click.option("--models", default=None, help="Comma-separated model ids this key may use (default: all).")
@click.option("--expires", default=None, help="Expiry date, YYYY-MM-DD (UTC).")
@click.option("--admin", is_flag=True, help="May use the admin endpoints (adapters, the web console).")
@click.option("--json", "as_json", is_flag=True)
def create(name, token_quota, rpm, tpm, max_concurrency, models, expires, admin, as_json) -> None:
    """Create a key and print it once."""
    from llmasos.server.auth import create_key

    model_list = [m.strip() for m in models.split(",") if m.strip()] if models else None
    secret = create_key(name, token_quota=token_quota, rpm=rpm, tpm=tpm, max_concurrency=max_concurrency,
                        models=model_list, expires=_date(expires), admin=admin)
    if as_json:
        click.echo(json.dumps({"name": name, "key": secret, "admin": admin}))
    else:
        click.echo(f"created key {name!r} — copy it now, it will not be shown again:\n{secret}")


@keys.command("list")
@click.option("--json", "as_json", is_flag=True)
def list_(as_json) -> None:
    """List keys (never their secrets)."""
    from rich.table import Table

    from llmasos.cli import table_console
    from llmasos.server.auth import list_keys

    rows = list_keys()
    if as_json:
        click.echo(json.dumps(rows))
        return
    table = Table("name", "prefix", "created", "expires", "status", "quota", "rpm", "tpm", "concurrency", "models",
                  "admin")
    for r in rows:
        table.add_row(r["name"], r["prefix"] + "…", r["created_at"], r["expires_at"] or "-",
                      "revoked" if r["revoked"] else "active", *(str(r[k] or "-") for k in
                                                                  ("token_quota", "rpm", "tpm", "max_concurrency")),
                      ",".join(r["models"]) if r["models"] else "all", "yes" if r["admin"] else "-")
    table_console().print(table)


@keys.command("revoke")
@click.argument("name")
def revoke(name) -> None:
    """Revoke a key by name."""
    from llmasos.server.auth import revoke_key

    revoke_key(name)
    click.echo(f"revoked key {name!r}")


@click.command()
@click.option("--key", "key_name", default=None, help="Only this key.")
@click.option("--since", default=None, help="Only usage from this date (YYYY-MM-DD, UTC).")
@click.option("--json", "as_json", is_flag=True)
def usage(key_name, since, as_json) -> None:
    """Metered usage per key and model: requests, tokens and cost."""
    from rich.table import Table

    from llmasos.cli import table_console
    from llmasos.server.auth import usage_summary

    rows = usage_summary(key_name, _date(since))
    if as_json:
        click.echo(json.dumps(rows))
        return
    table = Table("key", "model", "requests", "prompt tokens", "completion tokens", "cost ($)")
    for r in rows:
        table.add_row(r["key"] or "(no key)", r["model"], str(r["requests"]), str(r["prompt_tokens"]),
                      str(r["completion_tokens"]), f"{r['cost']:.6f}")
    table_console().print(table)


def register(cli: click.Group) -> None:
    cli.add_command(keys)
    cli.add_command(usage)
