"""Metrics out: JSON lines (`metrics.jsonl`) and TensorBoard event files, from process 0 only.

Both go through `smt_jax.storage`. A local `metrics.jsonl` is appended to row by row; an object
store has no append, so a remote one is held in memory and rewritten whole (one atomic put) at
every flush and at most every `REMOTE_FLUSH_S` seconds between them, and a remote TensorBoard
event file likewise (`_StoreRecordWriter`).
"""

from __future__ import annotations

import io
import json
import math
import os
import secrets
import time

from smt_jax import storage

PHASE_IDS = {"smt": 0, "dmt": 1, "bptt": 2}  # the TensorBoard scalar 'progress/phase'
RATE_KEYS = ("steps_per_s", "tokens_per_s")
REMOTE_FLUSH_S = 30.0


# The scalars TensorBoard's HParams dashboard shows beside each run's hyper-parameters (and the
# RNN's NLL in bits, named by the data: `Source.bits_unit`).
HPARAMS_METRICS = ("eval/rnn_nll", "eval/rnn_acc", "eval/rnn_prompted_nll", "eval/teacher_nll")


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
    self.path = storage.join(workdir, "metrics.jsonl")
    self.remote = storage.is_remote(workdir)
    self._lines: list[str] | None = None  # a remote file's rows, rewritten whole when flushed
    self._flushed = time.time()
    self._tb = None
    self._wandb = None
    self._progress_step = None
    if enabled:
      storage.makedirs(workdir)
      from tensorboardX import SummaryWriter  # event files any TensorBoard reads

      if self.remote:
        _register_store_writer(storage.protocol(workdir))
      self._tb = SummaryWriter(
        storage.join(workdir, "tensorboard"), flush_secs=30, purge_step=purge_step
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
    line = json.dumps(row, allow_nan=True) + "\n"
    if self.remote:
      self._remote_lines().append(line)
      if time.time() - self._flushed > REMOTE_FLUSH_S:
        self._flush_lines()
    else:
      with open(self.path, "a") as f:
        f.write(line)
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

  def write_config(self, config, bits_tag: str) -> None:
    """The config, flat, as TensorBoard HParams (shown beside `HPARAMS_METRICS` and the RNN's NLL
    in bits, `bits_tag`) and as text (the JSON that config.json holds)."""
    flat = {}

    def visit(prefix, node):
      for k, v in node.items():
        if hasattr(v, "items"):
          visit(f"{prefix}{k}.", v)
        else:
          flat[prefix + k] = v

    visit("", config)
    self.write_hparams(flat, [*HPARAMS_METRICS, bits_tag])
    self.write_text("config", "    " + config.to_json(indent=2).replace("\n", "\n    "), 0)

  def _remote_lines(self) -> list[str]:
    if self._lines is None:
      text = storage.read_text(self.path) if storage.exists(self.path) else ""
      self._lines = text.splitlines(keepends=True)
    return self._lines

  def _flush_lines(self) -> None:
    if self._lines is not None:
      storage.write_text(self.path, "".join(self._lines))
      self._flushed = time.time()

  def flush(self) -> None:
    if self.remote and self.enabled:
      self._flush_lines()
    if self._tb is not None:
      self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops rows logged after `step` (a resumed run rewrites them, so none appear twice).

    Also drops a last line cut short by a crash. `step` 0: a fresh start drops every row.
    """
    if not self.enabled or not storage.exists(self.path):
      return
    lines = storage.read_text(self.path).splitlines(keepends=True)
    keep = []
    for line in lines:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a crash
        continue
      if row["step"] <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    storage.write_text(self.path, "".join(keep))
    if self.remote:
      self._lines = keep

  def close(self) -> None:
    if self.remote and self.enabled:
      self._flush_lines()
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

    id_path = storage.join(workdir, "wandb_id")
    if storage.exists(id_path):
      run_id = storage.read_text(id_path).strip()
    else:
      run_id = secrets.token_hex(6)  # wandb ids: lowercase letters and digits
      storage.write_text(id_path, run_id)
    self._wandb = wandb
    self.run = wandb.init(
      project=project,
      entity=entity or None,
      name=name or os.path.basename(os.fspath(storage.path(workdir)).rstrip("/")),
      mode=mode or None,
      dir=storage.local_dir_for(workdir, "wandb"),  # wandb writes its run files locally
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


def wandb_of(config) -> dict | None:
  """The `MetricsWriter(wandb=...)` argument of a config: its Weights & Biases mirror, None when
  config.wandb.project is ''."""
  w = config.wandb
  if not w.project:
    return None
  return dict(project=w.project, entity=w.entity, name=w.name, mode=w.mode, config=config.to_dict())


def read_metrics(workdir: str) -> list[dict]:
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return []
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


# What summary.json's less obvious entries mean; written into it as "about".
SUMMARY_ABOUT = {
  "<phase>": "held-out metrics after that phase (smt, dmt, bptt); NLLs in nats per target token",
  "eval/rnn_nll": "the RNN alone, teacher-forced from its own learned initial memory",
  "eval/rnn_prompted_nll": "the RNN started from the teacher's memory of the first "
  "eval.prompt_length tokens",
  "eval/teacher_nll": "the teacher decoder's next-target prediction from its memory m_t, every t",
  "eval/teacher_full_nll": "the same where the teacher's window is full (t >= Tc - 1)",
  "eval/teacher_decoding_nll": "the reference's evaluation: the decoder's Tf-step loss from "
  "E(x[0 .. Tc-1])",
  "eval/drift_mse, eval/drift_1mr2": "the RNN's own states against the teacher's memories "
  "along the sequence: mean squared error and 1 - R^2 (0: on the teacher's track, 1: no "
  "better than the memories' mean, above 1: worse than that)",
  "baseline/unigram_nll": "the eval targets' own entropy: what a model without memory scores",
  "<phase>/compile_s": "seconds to compile and run the phase's first step",
  "<phase>/skipped_steps": "non-finite steps skipped (nan_policy='skip')",
  "wall_time_s": "the run's wall-clock seconds, restarts added up",
}


def write_summary(workdir: str, summary: dict) -> None:
  """summary.json: the results first (each phase's metrics, the baseline), then the rest."""
  summary = {k: v for k, v in summary.items() if k != "about"}
  first = [k for k in ("smt", "dmt", "bptt") if k in summary]
  first += sorted(k for k in summary if k.startswith("baseline/"))
  ordered = {k: summary[k] for k in first}
  ordered.update((k, summary[k]) for k in sorted(summary) if k not in ordered)
  ordered["about"] = SUMMARY_ABOUT
  storage.write_text(storage.join(workdir, "summary.json"), json.dumps(ordered, indent=2))


def read_summary(workdir: str) -> dict:
  """summary.json's entries ("about" left out)."""
  path = storage.join(workdir, "summary.json")
  if not storage.exists(path):
    return {}
  summary = json.loads(storage.read_text(path))
  summary.pop("about", None)
  return summary


class _StoreRecordWriter:
  """A TensorBoard event file on an object store: the records so far are kept in memory and the
  whole object is rewritten (one atomic put) at each flush (every 30 s, and at close)."""

  def __init__(self, path: str):
    self.path = path
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    storage.write_bytes(self.path, self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _StoreRecordWriterFactory:
  def open(self, path):
    return _StoreRecordWriter(path)

  def directory_check(self, path):
    del path  # object stores have no folders to create


def _register_store_writer(protocol: str) -> None:
  """Event files of `protocol`:// URLs go through `smt_jax.storage` (replacing tensorboardX's
  own writer for that protocol, if any, so that every file of a run takes one path)."""
  from tensorboardX import record_writer

  record_writer.register_writer_factory(protocol, _StoreRecordWriterFactory())
