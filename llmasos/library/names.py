"""Validation of the names users give: library model names, Hub repo ids and revisions, checked before any disk access.

A library name never becomes a path (model files live in directories with opaque ids), but names are still held to a
strict alphabet so that `..`, `/`, NUL bytes, absolute paths and control characters are refused up front."""

from __future__ import annotations

import re

from llmasos.errors import LibraryError

MAX_NAME_LENGTH = 128
_NAME = re.compile(r"[a-z0-9][a-z0-9._:-]*")
# The Hub's own rules: owner/name, letters, digits, '-', '_', '.'; no '--' or '..' and no leading/trailing '-' or '.'.
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
MAX_REPO_ID_LENGTH = 96
MAX_REVISION_LENGTH = 200


def _shown(value: str) -> str:
    """The value for an error message, shortened and with control characters escaped."""
    text = value if len(value) <= 60 else value[:57] + "..."
    return repr(text)


def check_name(name: object) -> str:
    """Return `name` if it is a valid library model name, else raise LibraryError saying what is wrong."""
    if not isinstance(name, str) or not name:
        raise LibraryError("a model name must be a non-empty string")
    if "\x00" in name:
        raise LibraryError(f"model name {_shown(name)} contains a NUL byte")
    if len(name) > MAX_NAME_LENGTH:
        raise LibraryError(f"model name {_shown(name)} is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}")
    if "/" in name or "\\" in name:
        raise LibraryError(f"model name {_shown(name)} contains a path separator; names look like "
                           "'qwen2.5:0.5b-instruct'")
    if ".." in name:
        raise LibraryError(f"model name {_shown(name)} contains '..'")
    if not _NAME.fullmatch(name):
        hint = ""
        lowered = name.lower()
        if lowered != name and _NAME.fullmatch(lowered):
            hint = f"; use {lowered!r}"
        raise LibraryError(
            f"model name {_shown(name)} is not valid: use lowercase letters, digits and '.', '_', ':', '-', starting "
            f"with a letter or digit{hint}")
    return name


def is_valid_name(name: object) -> bool:
    try:
        check_name(name)
    except LibraryError:
        return False
    return True


def check_repo_id(repo_id: str) -> str:
    """Return `repo_id` if it is a well-formed Hub model id ('owner/name'), else raise LibraryError."""
    if "\x00" in repo_id or len(repo_id) > MAX_REPO_ID_LENGTH:
        raise LibraryError(f"{_shown(repo_id)} is not a Hub repo id")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(part) for part in parts) or ".." in repo_id or "--" in repo_id:
        raise LibraryError(
            f"{_shown(repo_id)} is not a Hub repo id: expected 'owner/name' such as 'Qwen/Qwen2.5-0.5B-Instruct', "
            "or a catalog name (`llmasos list --available`)")
    return repo_id


def check_revision(revision: str) -> str:
    """A branch, tag or commit: refused if it could escape a URL path segment or is absurdly long."""
    if (not revision or len(revision) > MAX_REVISION_LENGTH or not _REVISION.fullmatch(revision) or ".." in revision
            or revision.endswith("/") or "//" in revision):
        raise LibraryError(f"revision {_shown(revision)} is not a valid branch, tag or commit name")
    return revision


def default_name_for_repo(repo_id: str, revision: str | None = None) -> str:
    """The library name a pulled repo gets when the user names none: its lowercased repo name (plus ':revision')."""
    name = repo_id.split("/")[-1].lower()
    if revision and revision != "main":
        name += ":" + re.sub(r"[^a-z0-9._-]", "-", revision.lower())
    return check_name(name[:MAX_NAME_LENGTH])
