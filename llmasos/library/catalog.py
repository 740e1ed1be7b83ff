"""The catalog: short names for well-known small open models on the Hugging Face Hub (`llmasos pull qwen2.5:0.5b`).

Each alias maps to a repo id; any other repo id can be pulled directly. Gated repos (Llama, Gemma, Mistral) need a
Hub token whose account has accepted the model's license."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogEntry:
    alias: str
    repo_id: str
    family: str
    parameters: str  # approximate, as the model's authors state it
    gated: bool = False


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry("qwen2.5:0.5b", "Qwen/Qwen2.5-0.5B", "qwen2", "0.5B"),
    CatalogEntry("qwen2.5:0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2", "0.5B"),
    CatalogEntry("qwen2.5:1.5b-instruct", "Qwen/Qwen2.5-1.5B-Instruct", "qwen2", "1.5B"),
    CatalogEntry("qwen2.5:3b-instruct", "Qwen/Qwen2.5-3B-Instruct", "qwen2", "3B"),
    CatalogEntry("qwen2.5:7b-instruct", "Qwen/Qwen2.5-7B-Instruct", "qwen2", "7B"),
    CatalogEntry("qwen2.5-coder:0.5b-instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "qwen2", "0.5B"),
    CatalogEntry("qwen2.5-coder:1.5b-instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct", "qwen2", "1.5B"),
    CatalogEntry("qwen3:0.6b", "Qwen/Qwen3-0.6B", "qwen3", "0.6B"),
    CatalogEntry("qwen3:0.6b-base", "Qwen/Qwen3-0.6B-Base", "qwen3", "0.6B"),
    CatalogEntry("qwen3:1.7b", "Qwen/Qwen3-1.7B", "qwen3", "1.7B"),
    CatalogEntry("qwen3:4b", "Qwen/Qwen3-4B", "qwen3", "4B"),
    CatalogEntry("qwen3:8b", "Qwen/Qwen3-8B", "qwen3", "8B"),
    CatalogEntry("llama3.2:1b", "meta-llama/Llama-3.2-1B", "llama", "1B", gated=True),
    CatalogEntry("llama3.2:1b-instruct", "meta-llama/Llama-3.2-1B-Instruct", "llama", "1B", gated=True),
    CatalogEntry("llama3.2:3b-instruct", "meta-llama/Llama-3.2-3B-Instruct", "llama", "3B", gated=True),
    CatalogEntry("llama3.1:8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", "llama", "8B", gated=True),
    CatalogEntry("smollm2:135m", "HuggingFaceTB/SmolLM2-135M", "llama", "135M"),
    CatalogEntry("smollm2:135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "llama", "135M"),
    CatalogEntry("smollm2:360m-instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", "llama", "360M"),
    CatalogEntry("smollm2:1.7b-instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "llama", "1.7B"),
    CatalogEntry("gemma2:2b", "google/gemma-2-2b", "gemma2", "2B", gated=True),
    CatalogEntry("gemma2:2b-instruct", "google/gemma-2-2b-it", "gemma2", "2B", gated=True),
    CatalogEntry("phi3:mini-instruct", "microsoft/Phi-3-mini-4k-instruct", "phi3", "3.8B"),
    CatalogEntry("phi3.5:mini-instruct", "microsoft/Phi-3.5-mini-instruct", "phi3", "3.8B"),
    CatalogEntry("mistral:7b-instruct", "mistralai/Mistral-7B-Instruct-v0.3", "mistral", "7B", gated=True),
    CatalogEntry("tinyllama:1.1b-chat", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "llama", "1.1B"),
    CatalogEntry("gpt2", "openai-community/gpt2", "gpt2", "124M"),
    CatalogEntry("gpt2:medium", "openai-community/gpt2-medium", "gpt2", "355M"),
    CatalogEntry("distilgpt2", "distilbert/distilgpt2", "gpt2", "82M"),
)

_BY_ALIAS = {entry.alias: entry for entry in CATALOG}
_BY_REPO = {entry.repo_id.lower(): entry for entry in CATALOG}


def lookup(alias: str) -> CatalogEntry | None:
    return _BY_ALIAS.get(alias)


def alias_for_repo(repo_id: str) -> str | None:
    """The catalog alias of a repo id (case-insensitive), so `pull Qwen/Qwen3-0.6B` is stored as 'qwen3:0.6b'."""
    entry = _BY_REPO.get(repo_id.lower())
    return entry.alias if entry else None
