"""Where LLMasOS keeps its state: $LLMASOS_HOME (default ~/.llmasos) holding models/ and the SQLite database."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The LLMasOS home directory, created on first use."""
    path = Path(os.environ.get("LLMASOS_HOME") or Path.home() / ".llmasos").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    path = home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
