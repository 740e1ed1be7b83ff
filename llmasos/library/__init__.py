"""The model library (the OS's package manager): a store under $LLMASOS_HOME/models/, a registry, a catalog of known
models, pull from the Hugging Face Hub, import, Modelfile-style derived models, and name -> files resolution.

The server and `LLM.load` need only `resolve_model`, `default_model_name` and `ResolvedModel`."""

from __future__ import annotations

from llmasos.library.resolve import (
    DEFAULT_MODEL_NAME,
    ResolvedModel,
    default_model_name,
    ensure_default_model,
    resolve_model,
    with_system_prompt,
)

__all__ = ["DEFAULT_MODEL_NAME", "ResolvedModel", "default_model_name", "ensure_default_model", "resolve_model",
           "with_system_prompt"]
