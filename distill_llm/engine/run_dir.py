"""The run directory contract, read by other tools:

  <run_dir>/metrics.jsonl   one JSON object per logged event ("kind": "train" | "valid")
                            train: step, lm_loss, kd_loss, intermediate_loss, loss, lr, grad_norm,
                                   tokens_per_s, step_time_s, eta_s
                            valid: step, val_lm_loss, val_ppl, val_kd_loss (null without teacher)
  <run_dir>/tb/             TensorBoard event files with the same scalars
  <run_dir>/config.yaml     the full resolved config of the run
  <run_dir>/checkpoints/    iter_N/ training checkpoints and a `latest` pointer
  <run_dir>/final/          the trained student alone, loadable as a model checkpoint

Only global rank 0 writes these files.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import yaml

from distill_llm.engine import parallel


def write_config(run_dir: Path, config: dict) -> None:
    """Writes `config` to `<run_dir>/config.yaml` (global rank 0 only)."""
    if parallel.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    """The events of `metrics.jsonl`, optionally only those of one kind."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if kind is None or e.get("kind") == kind]


class RunLog:
    """Appends events to metrics.jsonl and TensorBoard, and shows progress on the console."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int):
        self.enabled = parallel.is_main()
        self.total_steps = total_steps
        self._bar = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(run_dir / "metrics.jsonl", "a")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, event: dict) -> None:
        """Appends `event` to metrics.jsonl, its finite numbers to TensorBoard, and shows it on the
        console (global rank 0 only)."""
        if not self.enabled:
            return
        self._metrics.write(json.dumps(event) + "\n")
        self._metrics.flush()
        prefix = "train" if event["kind"] == "train" else "valid"
        for key, value in event.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)):
                if math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, event["step"])
        self._tb.flush()
        self._show(event)

    def _show(self, event: dict) -> None:
        step = event["step"]
        if event["kind"] == "train":
            parts = [f"lm {event['lm_loss']:.4f}"]
            if event.get("kd_loss") is not None:
                parts.append(f"kd {event['kd_loss']:.4f}")
            if event.get("intermediate_loss"):
                parts.append(f"inter {event['intermediate_loss']:.4f}")
            parts += [
                f"lr {event['lr']:.2e}",
                f"gnorm {event['grad_norm']:.3f}",
                f"{event['tokens_per_s']:.0f} tok/s",
            ]
            text = " | ".join(parts)
            if self._bar is not None:
                self._bar.set_postfix_str(text, refresh=False)
                self._bar.update(step - self._bar.n)
                return
            pct = 100.0 * step / max(self.total_steps, 1)
            eta = time.strftime("%H:%M:%S", time.gmtime(event["eta_s"]))
            print(f"step {step}/{self.total_steps} ({pct:.0f}%) | {text} | ETA {eta}", flush=True)
        else:
            text = f"validation @ step {step}: lm {event['val_lm_loss']:.4f}"
            text += f" | ppl {event['val_ppl']:.2f}"
            if event.get("val_kd_loss") is not None:
                text += f" | kd {event['val_kd_loss']:.4f}"
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        """Closes the progress bar, metrics.jsonl and the TensorBoard writer (rank 0 only)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._metrics.close()
        self._tb.close()
