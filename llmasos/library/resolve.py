"""Name or path -> model files and defaults: what `LLM.load`, `llmasos serve` and every command use to find a model.

An existing directory is used as is (like vLLM); otherwise the argument is looked up as a library name. Also registers
the bundled default model in a fresh home, and applies a model's system prompt to a conversation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmasos.errors import LibraryError, ModelLoadError
from llmasos.library import store
from llmasos.library.names import is_valid_name
from llmasos.library.registry import LibraryModel, get_model

DEFAULT_MODEL_NAME = "shakespeare:tiny"
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"
_DEFAULT_MARKER = ".default-model-registered"
GET_A_MODEL_HELP = ("pull one (`llmasos pull qwen2.5:0.5b-instruct`) or import a checkpoint directory "
                    "(`llmasos import DIR --name NAME`)")


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: its checkpoint directory plus the library's defaults for it (none for a plain path).

    `parameters` holds SamplingParams fields (temperature, max_tokens, stop, ...) that apply to requests that do not
    set them; `system` is prepended to conversations without a system message; `template` overrides the chat template.
    """

    name: str
    path: Path
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    adapter: Path | None = None
    library: bool = False

    def sampling_params(self, **request_values: Any):
        """SamplingParams from the model's defaults, with the request's own values (None = unset) winning."""
        from llmasos.sampling_params import SamplingParams

        values = dict(self.parameters)
        values.update({key: value for key, value in request_values.items() if value is not None})
        return SamplingParams(**values)

    def apply_system_prompt(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return with_system_prompt(messages, self.system)


def with_system_prompt(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """`messages` with a leading system message holding `system`, unless it is empty or the conversation has one."""
    if not system or any(isinstance(m, dict) and m.get("role") in ("system", "developer") for m in messages):
        return list(messages)
    return [{"role": "system", "content": system}, *messages]


def resolved_from_row(row: LibraryModel) -> ResolvedModel:
    path = store.checkpoint_path(row.directory)
    if not path.is_dir():
        path = _files_elsewhere(row, path)
    adapter = None
    if row.adapter:
        adapter = store.checkpoint_path(row.adapter)
        if not adapter.is_dir():
            raise LibraryError(f"the LoRA adapter of {row.name!r} is missing from the store ({adapter})")
    return ResolvedModel(name=row.name, path=path, system=row.system or None, parameters=dict(row.parameters or {}),
                         template=row.chat_template, adapter=adapter, library=True)


def _files_elsewhere(row: LibraryModel, path: Path) -> Path:
    """Where a registered model's files are when this server's store lacks them: the bundled model in the package
    (every server has it), or nowhere: then say how to fetch them. The registry may be shared by servers
    (LLMASOS_DATABASE_URL) that each keep their own store."""
    if row.source_type == "bundled" and _is_bundled(row):
        return BUNDLED_MODEL_DIR
    if row.source_type == "hub":  # the commit the registry records, so that every server holds the same files
        fetch = f"`llmasos pull {row.source_repo}:{row.source_commit} --name {row.name}`" if row.source_commit \
            else f"`llmasos pull {row.name}`"
        how = f"fetch them onto this server with {fetch} (same LLMASOS_DATABASE_URL)"
    else:
        how = (f"servers that share the database need the store's files too: give them one shared store volume, or "
               f"import the model on this server; or remove it with `llmasos rm {row.name}` and `llmasos pull` or "
               "import it again")
    raise LibraryError(f"the files of {row.name!r} are missing from this server's store ({path}): {how}")


def _is_bundled(row: LibraryModel) -> bool:
    """The package's bundled model has exactly the files the row records (sizes, then checksums)."""
    import hashlib

    entries = row.files or []
    if not entries or not BUNDLED_MODEL_DIR.is_dir():
        return False
    for entry in entries:
        file = BUNDLED_MODEL_DIR / entry["path"]
        if not file.is_file() or file.stat().st_size != int(entry["size"]):
            return False
    return all(hashlib.sha256((BUNDLED_MODEL_DIR / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
               for entry in entries)


def _is_repo_id(text: str) -> bool:
    """Whether `llmasos pull text` would take it as a Hub repo id (not, e.g., the missing path '/models/x')."""
    from llmasos.library.pull import parse_spec

    try:
        parse_spec(text)
    except ValueError:
        return False
    return "/" in text


def resolve_model(name_or_path: str | Path) -> ResolvedModel:
    """Resolve a library name or a checkpoint directory. Errors name the problem and how to get a model."""
    if isinstance(name_or_path, Path):
        return ResolvedModel(name=name_or_path.name or str(name_or_path), path=name_or_path.expanduser())
    text = str(name_or_path)
    if "\x00" in text:
        raise LibraryError("a model name or path cannot contain a NUL byte")
    candidate = Path(text).expanduser()
    if text and candidate.exists():
        return ResolvedModel(name=candidate.name or text, path=candidate)
    if not is_valid_name(text):
        hint = f"; to fetch it from the Hugging Face Hub run `llmasos pull {text}`" if _is_repo_id(text) else ""
        raise ModelLoadError(f"model {text!r} not found: there is no such directory and it is not a library model "
                             f"name{hint}")
    if text == DEFAULT_MODEL_NAME:
        ensure_default_model()
    row = get_model(text)
    if row is None and text == DEFAULT_MODEL_NAME and BUNDLED_MODEL_DIR.is_dir():
        raise LibraryError(f"{text} was removed from this library (`llmasos rm`), and a removal is kept; add it "
                           f"back with `llmasos import {BUNDLED_MODEL_DIR} --name {text} --link`")
    if row is None:
        raise LibraryError(f"no model named {text!r}: it is not in the library (`llmasos list` shows what is) and "
                           f"not a directory; {GET_A_MODEL_HELP}")
    return resolved_from_row(row)


def ensure_default_model() -> LibraryModel | None:
    """Register the bundled default model once per home, if the package ships it. A later `rm` is respected."""
    row = get_model(DEFAULT_MODEL_NAME)
    if row is not None or not BUNDLED_MODEL_DIR.is_dir():
        return row
    marker = store.root() / _DEFAULT_MARKER
    if marker.exists():
        return None
    from llmasos.library.importer import import_directory

    with store.lock("default-model"):
        row = get_model(DEFAULT_MODEL_NAME)
        if row is None and not marker.exists():
            row, _ = import_directory(BUNDLED_MODEL_DIR, DEFAULT_MODEL_NAME, link=True, source_type="bundled")
            marker.write_text(DEFAULT_MODEL_NAME + "\n", encoding="utf-8")
    return row


def default_model_name() -> str:
    """The model `llmasos serve` uses without --model: the bundled default, once it is registered."""
    if ensure_default_model() is not None:
        return DEFAULT_MODEL_NAME
    if BUNDLED_MODEL_DIR.is_dir():  # it ships with the package: it was removed with `llmasos rm`
        raise LibraryError(f"no model given and the bundled default model ({DEFAULT_MODEL_NAME}) is not installed: "
                           f"it was removed from this library; add it back with `llmasos import {BUNDLED_MODEL_DIR} "
                           f"--name {DEFAULT_MODEL_NAME} --link`, or pass --model NAME")
    raise LibraryError(f"no model given and the bundled default model ({DEFAULT_MODEL_NAME}) is not installed: "
                       f"{GET_A_MODEL_HELP}, then pass --model NAME")
