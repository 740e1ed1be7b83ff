"""Exceptions users can hit: each message names the thing that is wrong and, where there is one, the fix."""


class LLMasOSError(Exception):
    """Base class of every error LLMasOS raises on purpose."""


class ModelLoadError(LLMasOSError, ValueError):
    """A checkpoint directory cannot be loaded: missing files, unsupported family, corrupt or unsafe weights."""


class TemplateError(LLMasOSError, ValueError):
    """A chat template failed to render, or tried to do something the sandbox forbids."""


class EvalDataError(LLMasOSError, ValueError):
    """An evaluation data or task file cannot be used: missing, a malformed line, a missing field."""


class EndpointError(LLMasOSError, ValueError):
    """An OpenAI-compatible endpoint cannot be reached, refuses a request, or lacks what an evaluation needs."""


class TrainingDataError(LLMasOSError, ValueError):
    """Training or evaluation data cannot be used: unreadable file, malformed line, nothing left to train on."""


class LibraryError(LLMasOSError, ValueError):
    """A model library operation was refused or failed: bad name, unknown model, invalid checkpoint, failed pull."""


class SearchError(LLMasOSError, ValueError):
    """A semantic index cannot be created, changed or queried: bad name, unknown index, no documents, another model."""


class IndexNotFoundError(SearchError):
    """No semantic index of that name exists."""


def yaml_problem(exc: Exception) -> str:
    """One line for a PyYAML error: 'line L, column C: PROBLEM' (its own message spans four lines, with a caret)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if problem is None:
        return " ".join(str(exc).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"
