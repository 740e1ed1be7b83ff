"""The model registry: one row per library model, in the same database as the API keys (see `llmasos.db`).

A row says where the model's files are (an opaque directory id under the store), where they came from, what they are,
and the defaults a derived model adds on top of its base (system prompt, sampling parameters, chat template)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Integer, String, Text, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from llmasos.db import Base, session
from llmasos.errors import LibraryError
from llmasos.library.names import check_name

SOURCE_TYPES = ("hub", "local", "derived", "bundled")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class LibraryModel(Base):
    """A model in the library. `directory` names its files under the store; copies and derived models share it."""

    __tablename__ = "library_models"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    source_type: Mapped[str] = mapped_column(String(16))
    source_repo: Mapped[str | None] = mapped_column(String(128), default=None)
    source_revision: Mapped[str | None] = mapped_column(String(256), default=None)
    source_commit: Mapped[str | None] = mapped_column(String(64), default=None)
    source_path: Mapped[str | None] = mapped_column(Text, default=None)
    # The model this one was created FROM; the database refuses to delete a base that still has derived models.
    base_name: Mapped[str | None] = mapped_column(
        String(128), ForeignKey("library_models.name", ondelete="RESTRICT"), default=None, index=True)
    directory: Mapped[str] = mapped_column(String(160), index=True)
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    format: Mapped[str] = mapped_column(String(32), default="safetensors")
    family: Mapped[str] = mapped_column(String(64))
    num_parameters: Mapped[int] = mapped_column(BigInteger, default=0)
    dtype: Mapped[str | None] = mapped_column(String(32), default=None)
    context_length: Mapped[int | None] = mapped_column(Integer, default=None)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    chat_template: Mapped[str | None] = mapped_column(Text, default=None)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    system: Mapped[str | None] = mapped_column(Text, default=None)
    license: Mapped[str | None] = mapped_column(Text, default=None)
    adapter: Mapped[str | None] = mapped_column(String(160), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def source_text(self) -> str:
        """One short phrase saying where the model came from, for `llmasos list`."""
        if self.source_type == "hub":
            commit = (self.source_commit or "")[:12]
            return f"hf:{self.source_repo}@{commit}" if commit else f"hf:{self.source_repo}"
        if self.source_type == "derived":
            return f"from {self.base_name}"
        if self.source_type == "bundled":
            return "bundled"
        return self.source_path or "local"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "parameters": self.num_parameters,
            "dtype": self.dtype,
            "context_length": self.context_length,
            "size_bytes": self.size_bytes,
            "format": self.format,
            "source": {
                "type": self.source_type, "repo": self.source_repo, "revision": self.source_revision,
                "commit": self.source_commit, "path": self.source_path, "base": self.base_name,
            },
            "files": list(self.files or []),
            "license": self.license,
            "system": self.system,
            "sampling_parameters": dict(self.parameters or {}),
            "chat_template": self.chat_template,
            "adapter": self.adapter,
            "directory": self.directory,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }


def get_model(name: str) -> LibraryModel | None:
    check_name(name)
    with session() as db:
        return db.get(LibraryModel, name)


def require_model(name: str) -> LibraryModel:
    """The row for `name`, or a LibraryError that says how to see or get models."""
    row = get_model(name)
    if row is None:
        from llmasos.library.catalog import lookup

        # Suggest `pull NAME` only for a name pull knows: for any other it fails with "not in the catalog".
        get = (f"`llmasos pull {name}` fetches it" if lookup(name) is not None else
               "`llmasos list --available` shows the catalog `llmasos pull` fetches from")
        raise LibraryError(f"no model named {name!r} in the library: `llmasos list` shows the models you have; {get}")
    return row


def list_models() -> list[LibraryModel]:
    with session() as db:
        return list(db.scalars(select(LibraryModel).order_by(LibraryModel.name)))


def add_model(row: LibraryModel) -> None:
    """Insert a new row; a name that is already taken is refused (also when another process took it just now)."""
    check_name(row.name)
    try:
        with session() as db:
            if db.get(LibraryModel, row.name) is not None:
                raise LibraryError(f"a model named {row.name!r} already exists: remove it first (`llmasos rm "
                                   f"{row.name}`) or choose another name")
            db.add(row)
    except IntegrityError:
        raise LibraryError(f"a model named {row.name!r} was just added by another process; choose another name") \
            from None


def replace_model(row: LibraryModel) -> str | None:
    """Insert `row`, or update the existing row of that name in place (a new pull of the same model, which keeps
    the models derived from it); return the directory the old row used, if any."""
    check_name(row.name)
    with session() as db:
        old = db.get(LibraryModel, row.name)
        if old is None:
            db.add(row)
            return None
        old_directory = old.directory
        for column in LibraryModel.__table__.columns:
            if column.key != "name":
                setattr(old, column.key, getattr(row, column.key))
    return old_directory


def derived_models(name: str) -> list[str]:
    with session() as db:
        return list(db.scalars(select(LibraryModel.name).where(LibraryModel.base_name == name)
                               .order_by(LibraryModel.name)))


def directory_users(directory: str) -> list[str]:
    """Names of the models whose files (or adapter) live in `directory`."""
    with session() as db:
        rows = db.scalars(select(LibraryModel.name).where(
            (LibraryModel.directory == directory) | (LibraryModel.adapter == directory)))
        return list(rows)


def delete_model(name: str) -> LibraryModel:
    """Delete the row; refused while derived models use it as their base. Returns the deleted row."""
    row = require_model(name)
    children = derived_models(name)
    if children:
        shown = ", ".join(children)
        raise LibraryError(f"cannot remove {name!r}: {shown} {'is' if len(children) == 1 else 'are'} derived from it; "
                           f"remove {'it' if len(children) == 1 else 'them'} first (`llmasos rm {children[0]}`)")
    try:
        with session() as db:
            current = db.get(LibraryModel, name)
            if current is not None:
                db.delete(current)
    except IntegrityError:
        raise LibraryError(f"cannot remove {name!r}: a model derived from it was just created; remove that first") \
            from None
    return row


def copy_row(source: LibraryModel, name: str, **changes: Any) -> LibraryModel:
    """A new row with `source`'s data under `name` (files shared), with `changes` applied."""
    columns = {column.key: getattr(source, column.key) for column in LibraryModel.__table__.columns}
    columns.update(name=name, created_at=utcnow(), **changes)
    columns["files"] = [dict(entry) for entry in columns.get("files") or []]
    columns["parameters"] = dict(columns.get("parameters") or {})
    return LibraryModel(**columns)
