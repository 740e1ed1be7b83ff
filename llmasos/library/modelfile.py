"""`llmasos create NAME -f Modelfile`: a derived model that shares its base's weights and adds defaults.

Instructions (Ollama's syntax): FROM <library model>, SYSTEM <text>, PARAMETER <name> <value> (repeatable; `stop` may
repeat), TEMPLATE <Jinja chat template>, ADAPTER <LoRA adapter directory>, LICENSE <text>. Values may be quoted with
"..." or span lines inside triple quotes. Lines starting with # are comments.

`PARAMETER quantization int8|int4|w8a8` (and `PARAMETER quantization_group_size 32|64|128` for int4) is not a sampling
default: the model is stored as a new, quantized checkpoint (llmasos.library.quantized)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from llmasos.errors import LibraryError, LLMasOSError
from llmasos.library import store
from llmasos.library.names import check_name, is_valid_name
from llmasos.library.registry import LibraryModel, add_model, copy_row, get_model, require_model

INSTRUCTIONS = ("FROM", "SYSTEM", "PARAMETER", "TEMPLATE", "ADAPTER", "LICENSE")
_FLOAT_PARAMETERS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_INT_PARAMETERS = ("top_k", "max_tokens", "seed", "min_tokens")
_QUANTIZATION_PARAMETERS = ("quantization", "quantization_group_size")
# Ollama's spellings of the same parameters.
_PARAMETER_ALIASES = {"num_predict": "max_tokens", "repeat_penalty": "repetition_penalty"}
MAX_MODELFILE_BYTES = 1 << 20


@dataclass
class Modelfile:
    base: str
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    adapter: str | None = None
    license: str | None = None


def _value(text: str, lines: list[str], index: int) -> tuple[str, int]:
    """The argument starting at `text` (rest of line `index`): triple-quoted (maybe multi-line), quoted or bare."""
    stripped = text.strip()
    if stripped.startswith('"""'):
        body = stripped[3:]
        if '"""' in body:
            value, _, after = body.partition('"""')
            if after.strip():
                raise LibraryError(f"Modelfile line {index + 1}: unexpected text after the closing \"\"\"")
            return value, index
        parts = [body]
        for next_index in range(index + 1, len(lines)):
            line = lines[next_index]
            if '"""' in line:
                before, _, after = line.partition('"""')
                if after.strip():
                    raise LibraryError(f"Modelfile line {next_index + 1}: unexpected text after the closing \"\"\"")
                parts.append(before)
                return "\n".join(parts).strip("\n"), next_index
            parts.append(line)
        raise LibraryError(f"Modelfile line {index + 1}: the \"\"\" opened here is never closed")
    if len(stripped) >= 2 and stripped[0] == stripped[-1] == '"':
        return stripped[1:-1].replace('\\"', '"').replace("\\n", "\n"), index
    return stripped, index


def _parameter(argument: str, line_number: int, parameters: dict[str, Any]) -> None:
    key, _, raw = argument.strip().partition(" ")
    key = _PARAMETER_ALIASES.get(key.lower(), key.lower())
    raw, _ = _value(raw, [], 0)
    if not raw:
        raise LibraryError(f"Modelfile line {line_number}: PARAMETER {key} needs a value")
    if key == "stop":
        parameters.setdefault("stop", []).append(raw)
        return
    if key in _QUANTIZATION_PARAMETERS:
        parameters[key] = _quantization_value(key, raw, line_number)
        return
    if key not in _FLOAT_PARAMETERS and key not in _INT_PARAMETERS:
        supported = ", ".join((*_FLOAT_PARAMETERS, *_INT_PARAMETERS, "stop", *_QUANTIZATION_PARAMETERS))
        raise LibraryError(f"Modelfile line {line_number}: unknown PARAMETER {key!r}; supported: {supported}")
    try:
        parameters[key] = float(raw) if key in _FLOAT_PARAMETERS else int(raw)
    except ValueError:
        kind = "a number" if key in _FLOAT_PARAMETERS else "an integer"
        raise LibraryError(f"Modelfile line {line_number}: PARAMETER {key} takes {kind}, got {raw!r}") from None


def _quantization_value(key: str, raw: str, line_number: int) -> str | int:
    from llmasos.spec import INT4_GROUP_SIZES, QUANTIZATION_METHODS

    if key == "quantization":
        if raw.lower() not in QUANTIZATION_METHODS:
            raise LibraryError(f"Modelfile line {line_number}: PARAMETER quantization takes "
                               f"{' or '.join(QUANTIZATION_METHODS)}, got {raw!r}")
        return raw.lower()
    sizes = ", ".join(map(str, INT4_GROUP_SIZES))
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value not in INT4_GROUP_SIZES:
        raise LibraryError(f"Modelfile line {line_number}: PARAMETER quantization_group_size takes {sizes}, "
                           f"got {raw!r}")
    return value


def parse_modelfile(text: str) -> Modelfile:
    """Parse and check a Modelfile; every error names its line."""
    if "\x00" in text:
        raise LibraryError("the Modelfile contains a NUL byte")
    lines = text.splitlines()
    values: dict[str, Any] = {"parameters": {}}
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        line_number = index + 1
        if not line or line.startswith("#"):
            index += 1
            continue
        keyword, _, argument = line.partition(" ")
        keyword = keyword.upper()
        if keyword not in INSTRUCTIONS:
            raise LibraryError(f"Modelfile line {line_number}: unknown instruction {keyword!r}; a Modelfile takes "
                               f"{', '.join(INSTRUCTIONS)}")
        if keyword == "PARAMETER":
            _parameter(argument, line_number, values["parameters"])
            index += 1
            continue
        value, index = _value(argument, lines, index)
        field_name = {"FROM": "base", "SYSTEM": "system", "TEMPLATE": "template", "ADAPTER": "adapter",
                      "LICENSE": "license"}[keyword]
        if field_name in values:
            raise LibraryError(f"Modelfile line {line_number}: {keyword} is given twice")
        values[field_name] = value
        index += 1
    if "base" not in values:
        raise LibraryError("the Modelfile has no FROM line: start it with `FROM <library model name>`")
    base = values["base"]
    if not is_valid_name(base):
        raise LibraryError(f"FROM {base!r}: FROM takes the name of a library model; to use a directory, import it "
                           "first with `llmasos import DIR --name NAME`")
    modelfile = Modelfile(**values)
    _check_values(modelfile)
    return modelfile


def _check_values(modelfile: Modelfile) -> None:
    from llmasos.sampling_params import SamplingParams

    if "quantization_group_size" in modelfile.parameters and modelfile.parameters.get("quantization") != "int4":
        raise LibraryError("Modelfile PARAMETER quantization_group_size applies to int4 quantization only: add "
                           "`PARAMETER quantization int4` or remove the group size")
    known = {f.name for f in fields(SamplingParams) if f.init}
    try:
        SamplingParams(**{k: v for k, v in modelfile.parameters.items() if k in known})
    except ValueError as exc:
        raise LibraryError(f"Modelfile PARAMETER: {exc}") from None
    if modelfile.template is not None:
        from llmasos.chat_template import compile_chat_template

        if not modelfile.template.strip():
            raise LibraryError("Modelfile TEMPLATE is empty")
        try:
            compile_chat_template(modelfile.template)
        except LLMasOSError as exc:
            raise LibraryError(f"Modelfile TEMPLATE: {exc}") from None


def _store_adapter(adapter: str, relative_to: Path, name: str, base: LibraryModel) -> str:
    from llmasos.library.validate import inspect_adapter

    source = Path(adapter).expanduser()
    if not source.is_absolute():
        source = relative_to / source
    files = inspect_adapter(source, store.checkpoint_path(base.directory), base.name)
    with store.staging(f"{name}-adapter") as staged:
        for relative in files:
            store.copy_with_hash(source / relative, staged / relative)
        return store.place(staged, f"{name}-adapter")


def create_model(name: str, modelfile_text: str, relative_to: Path | None = None) -> LibraryModel:
    """Create `name` from a Modelfile; relative ADAPTER paths are taken from `relative_to` (the Modelfile's folder)."""
    check_name(name)
    if len(modelfile_text.encode("utf-8", errors="replace")) > MAX_MODELFILE_BYTES:
        raise LibraryError("the Modelfile is larger than 1 MiB")
    return create_from_modelfile(name, parse_modelfile(modelfile_text), relative_to)


def create_from_modelfile(name: str, modelfile: Modelfile, relative_to: Path | None = None) -> LibraryModel:
    """Create `name` from a Modelfile already parsed or built in code (`llmasos run`'s /save); values are checked
    here as `parse_modelfile` checks them."""
    check_name(name)
    if not is_valid_name(modelfile.base):
        raise LibraryError(f"FROM {modelfile.base!r}: FROM takes the name of a library model")
    _check_values(modelfile)
    if modelfile.base == name:
        raise LibraryError(f"a model cannot be created FROM itself ({name!r})")
    if "quantization" in modelfile.parameters:
        from llmasos.library.quantized import create_quantized

        return create_quantized(name, modelfile, relative_to or Path.cwd())
    with store.lock(store.REGISTRY_LOCK):  # the base must not be removed while the new model starts sharing it
        return _create_locked(name, modelfile, relative_to)


def check_new_derived(name: str, modelfile: Modelfile, base: LibraryModel) -> None:
    """What any derived model needs: a free name, and at most one LoRA adapter in its line."""
    if get_model(name) is not None:
        raise LibraryError(f"a model named {name!r} already exists: remove it first (`llmasos rm {name}`) or choose "
                           "another name")
    if modelfile.adapter is not None and base.adapter is not None:
        raise LibraryError(f"{base.name!r} already has a LoRA adapter; create FROM the model it was derived from")


def _create_locked(name: str, modelfile: Modelfile, relative_to: Path | None) -> LibraryModel:
    base = require_model(modelfile.base)
    check_new_derived(name, modelfile, base)
    if modelfile.adapter is not None:
        from llmasos.library.quantized import checkpoint_quantization

        if checkpoint_quantization(store.checkpoint_path(base.directory)) is not None:
            raise LibraryError(f"{base.name!r} is stored quantized and a LoRA adapter cannot be merged into it; "
                               "create FROM its float base with both ADAPTER and PARAMETER quantization lines")
    parameters = {**(base.parameters or {}), **modelfile.parameters}
    adapter = base.adapter
    if modelfile.adapter is not None:
        adapter = _store_adapter(modelfile.adapter, relative_to or Path.cwd(), name, base)
    row = copy_row(
        base, name, source_type="derived", base_name=base.name, parameters=parameters,
        system=modelfile.system if modelfile.system is not None else base.system,
        chat_template=modelfile.template if modelfile.template is not None else base.chat_template,
        license=modelfile.license if modelfile.license is not None else base.license, adapter=adapter)
    try:
        add_model(row)
    except BaseException:
        if adapter is not None and adapter != base.adapter:
            store.remove_directory(adapter)
        raise
    return row


def render_modelfile(row: LibraryModel) -> str:
    """A Modelfile that recreates `row` from its base (for `llmasos show --modelfile`)."""
    out = [f"FROM {row.base_name or row.name}"]
    from llmasos.library.quantized import quantized_from_base

    quantized = quantized_from_base(row)
    if quantized is not None:
        method, group_size = quantized
        out.append(f"PARAMETER quantization {method}")
        if method == "int4":
            out.append(f"PARAMETER quantization_group_size {group_size}")
    if row.system:
        out.append(f'SYSTEM """{row.system}"""')
    for key, value in (row.parameters or {}).items():
        for item in value if isinstance(value, list) else [value]:
            shown = f'"{item}"' if isinstance(item, str) and re.search(r"\s", item) else item
            out.append(f"PARAMETER {key} {shown}")
    if row.chat_template:
        out.append(f'TEMPLATE """{row.chat_template}"""')
    if row.license:
        out.append(f'LICENSE """{row.license}"""')
    return "\n".join(out) + "\n"
