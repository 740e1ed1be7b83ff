"""Name, repo id and revision validation: what is accepted, and every hostile shape refused with a clear reason."""

from __future__ import annotations

import pytest

from llmasos.errors import LibraryError
from llmasos.library.names import (
    MAX_NAME_LENGTH,
    check_name,
    check_repo_id,
    check_revision,
    default_name_for_repo,
    is_valid_name,
)

VALID_NAMES = ["qwen2.5:0.5b-instruct", "gpt2", "my_model:v1.2", "a", "0", "x" * MAX_NAME_LENGTH, "llama3.2:1b"]
HOSTILE_NAMES = {
    "dotdot": "..",
    "traversal": "../../etc/passwd",
    "inner-dotdot": "model..name",
    "slash": "org/model",
    "backslash": "a\\b",
    "absolute": "/etc/passwd",
    "nul": "model\x00name",
    "too-long": "x" * (MAX_NAME_LENGTH + 1),
    "uppercase": "Qwen",
    "leading-dot": ".hidden",
    "leading-dash": "-rf",
    "space": "my model",
    "newline": "model\nname",
    "empty": "",
    "unicode": "modèle",
    "home": "~root",
}


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names_pass(name):
    assert check_name(name) == name
    assert is_valid_name(name)


@pytest.mark.parametrize("name", list(HOSTILE_NAMES.values()), ids=list(HOSTILE_NAMES))
def test_hostile_names_refused(name):
    with pytest.raises(LibraryError) as info:
        check_name(name)
    message = str(info.value)
    assert "\x00" not in message and "\n" not in message  # the message itself is safe to print on one line
    assert not is_valid_name(name)


def test_error_messages_say_what_is_wrong():
    with pytest.raises(LibraryError, match="NUL"):
        check_name("a\x00b")
    with pytest.raises(LibraryError, match="129 characters.*limit is 128"):
        check_name("a" * 129)
    with pytest.raises(LibraryError, match="path separator"):
        check_name("a/b")
    with pytest.raises(LibraryError, match="use 'qwen'"):
        check_name("Qwen")


@pytest.mark.parametrize("repo_id", ["Qwen/Qwen2.5-0.5B-Instruct", "openai-community/gpt2", "a/b", "HuggingFaceTB/x.y"])
def test_repo_ids_accepted(repo_id):
    assert check_repo_id(repo_id) == repo_id


@pytest.mark.parametrize("repo_id", ["gpt2", "a/b/c", "../x", "a/..", "a/b..c", "/abs", "a/", "a--b/c", "a/b\x00",
                                     "a/b c", "a/" + "x" * 100])
def test_bad_repo_ids_refused(repo_id):
    with pytest.raises(LibraryError):
        check_repo_id(repo_id)


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/1", "a" * 40])
def test_revisions_accepted(revision):
    assert check_revision(revision) == revision


@pytest.mark.parametrize("revision", ["", "../main", "a/../b", "/main", "main/", "a//b", "x" * 201, "a b", "a\x00"])
def test_bad_revisions_refused(revision):
    with pytest.raises(LibraryError):
        check_revision(revision)


def test_default_name_for_repo():
    assert default_name_for_repo("Qwen/Qwen2.5-0.5B-Instruct") == "qwen2.5-0.5b-instruct"
    assert default_name_for_repo("org/Model", "v1.0") == "model:v1.0"
    assert default_name_for_repo("org/Model", "refs/pr/1") == "model:refs-pr-1"
