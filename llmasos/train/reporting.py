"""What a run shows and records: a rich progress bar (step, loss, tokens/s, ETA), output_dir/metrics.jsonl, and
TensorBoard event files when the tensorboard package is installed. Only rank 0 reports."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

METRICS_FILE = "metrics.jsonl"


def trim_metrics(path: Path, step: int) -> None:
    """Keep the records of steps up to `step` (where a resumed run starts again; 0 for a new run in an old
    directory), so that the curve has each step once. Rewritten aside and renamed into place."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record_step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            dropped += 1  # a line cut by a crash
            continue
        if isinstance(record_step, (int, float)) and record_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)


class Reporter:
    def __init__(self, output_dir: Path, total_steps: int, start_step: int, enabled: bool, progress_bar: bool,
                 console: Console | None = None) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None
        self._writer = None
        self._metrics = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        trim_metrics(output_dir / METRICS_FILE, start_step)
        self._metrics = (output_dir / METRICS_FILE).open("a", encoding="utf-8")
        try:  # optional: TensorBoard event files next to metrics.jsonl
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        except ImportError:
            self._writer = None
        # A live bar needs a terminal; elsewhere (CI, nohup) each logged step is printed as one line instead.
        self.live = progress_bar and self.console.is_terminal
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, loss="-",
                                                 speed="-")
            self._progress.start()

    def advance(self, step: int, loss: float | None = None, tokens_per_second: float | None = None) -> None:
        if self._progress is not None:
            fields: dict[str, Any] = {}
            if loss is not None:
                fields["loss"] = f"{loss:.4f}"
            if tokens_per_second is not None:
                fields["speed"] = f"{tokens_per_second:,.0f}"
            self._progress.update(self._task, completed=step, **fields)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record ({"step": ..., "loss": ...} or {"step": ..., "eval_loss": ...}) everywhere."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{'eval' if key.startswith('eval_') else 'train'}/{key}", value,
                                            record["step"])
        if not self.live:
            shown = " ".join(f"{key}={_short(value)}" for key, value in record.items() if key != "time")
            self.console.print(shown, highlight=False, soft_wrap=True)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)
