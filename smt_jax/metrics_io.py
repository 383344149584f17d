"""Metrics out: JSON lines (`metrics.jsonl`) and TensorBoard event files, from process 0 only."""

from __future__ import annotations

import json
import math
import os


class MetricsWriter:
  """Appends one JSON object per line: {"step", "phase", "phase_step", ...metrics}."""

  def __init__(self, workdir: str, *, enabled: bool = True, purge_step: int | None = None):
    """purge_step: a resumed run's first step; TensorBoard then hides the older event files'
    points from that step on (those steps are rerun), as `truncate_after` does for the JSON lines.
    """
    self.enabled = enabled
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # event files any TensorBoard reads

      self._tb = SummaryWriter(
        os.path.join(workdir, "tensorboard"), flush_secs=30, purge_step=purge_step
      )

  def write(self, step: int, phase: str, phase_step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "phase": phase, "phase_step": int(phase_step)}
    row.update({k: float(v) for k, v in values.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row, allow_nan=True) + "\n")
    for k, v in values.items():
      if math.isfinite(float(v)):
        self._tb.add_scalar(f"{phase}/{k}", float(v), int(step))

  def truncate_after(self, step: int) -> None:
    """Drops rows logged after `step` (a resumed run rewrites them, so none appear twice).

    Also drops a last line cut short by a crash. `step` 0: a fresh start drops every row.
    """
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    keep = []
    for line in lines:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a crash
        continue
      if row["step"] <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_summary(workdir: str) -> dict:
  path = os.path.join(workdir, "summary.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def write_summary(workdir: str, summary: dict) -> None:
  tmp = os.path.join(workdir, "summary.json.tmp")
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(workdir, "summary.json"))
