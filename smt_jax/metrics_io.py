"""Metrics out: JSON lines (`metrics.jsonl`) and TensorBoard event files, from process 0 only."""

from __future__ import annotations

import json
import math
import os
import secrets

PHASE_IDS = {"smt": 0, "dmt": 1, "bptt": 2}  # the TensorBoard scalar 'progress/phase'
RATE_KEYS = ("steps_per_s", "tokens_per_s")


def tensorboard_tags(phase: str, key: str) -> list[tuple[str, str]]:
  """TensorBoard (tag, x-axis) pairs for metric `key` of a row of `phase`; x-axis in {'step',
  'tokens', 'seqflops'}.

  Eval metrics are phase-free ('eval/rnn_nll'), on the one global step axis, so that a BPTT run
  and an SMT->DMT run share a chart; the RNN's are also logged against tokens seen
  ('eval_vs_tokens/rnn_nll') and SeqFLOPs ('eval_vs_seqflops/rnn_nll'). Throughput is phase-free
  ('perf/steps_per_s'); training terms differ in meaning between phases and keep the phase
  ('train/smt/loss', 'train/bptt/loss').
  """
  if key.startswith("eval/"):
    tags = [(key, "step")]
    if key.startswith("eval/rnn_"):
      name = key[len("eval/") :]
      tags += [(f"eval_vs_tokens/{name}", "tokens"), (f"eval_vs_seqflops/{name}", "seqflops")]
    return tags
  if key in RATE_KEYS:
    return [(f"perf/{key}", "step")]
  return [(f"train/{phase}/{key}", "step")]


class MetricsWriter:
  """Appends one JSON object per line: {"step", "phase", "phase_step", "tokens", "seqflops",
  ...metrics}, and mirrors it to TensorBoard (`tensorboard_tags`).

  `step` is the run's global step (phase offsets added); `tokens` the training tokens seen and
  `seqflops` the SeqFLOPs spent up to it, over every phase so far.
  """

  def __init__(
    self,
    workdir: str,
    *,
    enabled: bool = True,
    purge_step: int | None = None,
    wandb: dict | None = None,
  ):
    """purge_step: a resumed run's first step; TensorBoard then hides the older event files'
    points from that step on (those steps are rerun), as `truncate_after` does for the JSON lines.
    wandb: {'project', 'entity', 'name', 'mode', 'config'} to mirror everything to Weights &
    Biases (`WandbMirror`); None: off.
    """
    self.enabled = enabled
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._wandb = None
    self._progress_step = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # event files any TensorBoard reads

      self._tb = SummaryWriter(
        os.path.join(workdir, "tensorboard"), flush_secs=30, purge_step=purge_step
      )
      if wandb:
        self._wandb = WandbMirror(workdir, **wandb)

  def write(
    self,
    step: int,
    phase: str,
    phase_step: int,
    values: dict[str, float],
    *,
    tokens: int = 0,
    seqflops: float = 0.0,
  ) -> None:
    if not self.enabled:
      return
    row = {
      "step": int(step),
      "phase": phase,
      "phase_step": int(phase_step),
      "tokens": int(tokens),
      "seqflops": float(seqflops),
    }
    row.update({k: float(v) for k, v in values.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row, allow_nan=True) + "\n")
    x = {"step": int(step), "tokens": int(tokens), "seqflops": int(seqflops)}
    mirrored = {}
    for k, v in values.items():
      if math.isfinite(float(v)):
        for tag, axis in tensorboard_tags(phase, k):
          self._tb.add_scalar(tag, float(v), x[axis])
          if axis == "step":  # wandb: one step axis, tokens and SeqFLOPs logged beside it
            mirrored[tag] = float(v)
    if self._wandb is not None:
      mirrored.update({"progress/tokens": int(tokens), "progress/seqflops": float(seqflops)})
      self._wandb.log(dict(mirrored, **{"progress/phase": PHASE_IDS.get(phase, -1)}), step)
    if step != self._progress_step:  # once per step (a train row and an eval row share one)
      self._progress_step = step
      self._tb.add_scalar("progress/phase", PHASE_IDS.get(phase, -1), int(step))
      self._tb.add_scalar("progress/tokens", int(tokens), int(step))
      self._tb.add_scalar("progress/seqflops", float(seqflops), int(step))

  def write_text(self, tag: str, text: str, step: int) -> None:
    """A text entry (markdown) at global `step`."""
    if self.enabled:
      self._tb.add_text(tag, text, int(step))
      if self._wandb is not None:
        self._wandb.log_text(tag, text, step)

  def write_image(self, tag: str, image, step: int) -> None:
    """An image (float [H, W] or [H, W, 3] in [0, 1]) at global `step`."""
    if self.enabled:
      fmt = "HW" if image.ndim == 2 else "HWC"
      self._tb.add_image(tag, image, int(step), dataformats=fmt)
      if self._wandb is not None:
        self._wandb.log_image(tag, image, step)

  def write_hparams(self, hparams: dict, metric_tags: list[str]) -> None:
    """The run's hyper-parameters for TensorBoard's HParams dashboard, with the scalars
    (`metric_tags`, e.g. 'eval/rnn_nll') it shows beside them; written into this run's own
    event file, so the dashboard reads the metrics from the run's scalars."""
    if not self.enabled:
      return
    from tensorboardX.summary import hparams as hparams_summary

    # The plugin takes numbers, strings and booleans; other values are shown as strings.
    clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
    writer = self._tb._get_file_writer()
    for summary in hparams_summary(clean, {t: float("nan") for t in metric_tags}):
      writer.add_summary(summary)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

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
    if self._wandb is not None:
      self._wandb.close()


class WandbMirror:
  """The run mirrored to Weights & Biases: config, metrics (on the global step, with tokens and
  SeqFLOPs logged beside them to pick as x-axes) and samples.

  `wandb` is imported here only, so it is needed only when `wandb.project` is set. The wandb run
  id is kept in `<workdir>/wandb_id`, so a resumed run continues the same wandb run (wandb drops
  rows of steps it has already seen: those a resumed run rewrites keep their first values there).
  """

  def __init__(self, workdir: str, *, project: str, entity: str, name: str, mode: str, config):
    import wandb

    id_path = os.path.join(workdir, "wandb_id")
    if os.path.exists(id_path):
      with open(id_path) as f:
        run_id = f.read().strip()
    else:
      run_id = secrets.token_hex(6)  # wandb ids: lowercase letters and digits
      with open(id_path, "w") as f:
        f.write(run_id)
    self._wandb = wandb
    self.run = wandb.init(
      project=project,
      entity=entity or None,
      name=name or os.path.basename(os.path.abspath(workdir)),
      mode=mode or None,
      dir=workdir,
      id=run_id,
      resume="allow",
      config=config,
    )

  def log(self, values: dict, step: int) -> None:
    self.run.log(values, step=int(step))

  def log_text(self, tag: str, text: str, step: int) -> None:
    import html

    self.run.log({tag: self._wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=int(step))

  def log_image(self, tag: str, image, step: int) -> None:
    self.run.log({tag: self._wandb.Image(image)}, step=int(step))

  def close(self) -> None:
    self.run.finish()


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
