"""Exceptions users can hit: each message names the thing that is wrong and, where there is one, the fix."""


class LLMasOSError(Exception):
    """Base class of every error LLMasOS raises on purpose."""


class ModelLoadError(LLMasOSError, ValueError):
    """A checkpoint directory cannot be loaded: missing files, unsupported family, corrupt or unsafe weights."""


class TemplateError(LLMasOSError, ValueError):
    """A chat template failed to render, or tried to do something the sandbox forbids."""
