"""What a run says to its user on stdout (process 0 only): when a step compiles, its progress
with an ETA over every phase and eval left, each eval in one line against the unigram baseline,
and a verdict at the end that reads in five seconds.

The ETA adds the current phase's measured time per step, the measured time of an eval (guessed
at two training steps' before the first), and for the phases not yet started an estimate: the
current phase's time per FLOP times their FLOPs per step (`experiment.work_per_step`, a model of
the matmul work) plus a compile as long as the current phase's. It is marked '~' while it rests on
such an estimate.
"""

from __future__ import annotations

import dataclasses

import jax

from smt_jax.runner import experiment


def say(msg: str) -> None:
  """A progress line on stdout, from process 0 only (absl logging is left to the libraries)."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def eval_steps(steps: int, every: int, first: int) -> list[int]:
  """The steps (1-based counts) after which a phase of `steps` steps evaluates: every `every`
  (0: never), once after `first` (0: not), and always after its last step."""
  due = {s for s in range(every, steps, every)} if every > 0 else set()
  if 0 < first < steps:
    due.add(first)
  return sorted(due | {steps})


def format_duration(seconds: float) -> str:
  """'42s', '3m05s', '2h07m'."""
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclasses.dataclass
class Clock:
  """The run's measured times, for the ETA."""

  phase: str = ""
  step_s: float | None = None  # training seconds per step of `phase`, evals excluded
  compile_s: float = 0.0
  eval_s: list[float] = dataclasses.field(default_factory=list)


class Console:
  """The run's voice: every method returns the line it printed (tests read them)."""

  def __init__(self, exp: experiment.Experiment, say, flops: dict[str, float]):
    self.exp, self.say = exp, say
    e = exp.eval_spec
    self.work = {p: experiment.work_per_step(exp, p, flops) for p in exp.phases}
    self.evals = {p: eval_steps(exp.steps[p], e.every_steps, e.first_step) for p in exp.phases}
    self.unit = {"bits_per_dim": "pixel", "bits_per_byte": "byte"}.get(
      exp.source.bits_unit, "token"
    )
    self.clock = Clock()

  def compiling(self, phase: str, resumed_at: int) -> str:
    where = f" (resuming at step {resumed_at})" if resumed_at else ""
    return self._say(f"{phase}: compiling its train step{where}...")

  def compiled(self, phase: str, seconds: float) -> str:
    self.clock.phase, self.clock.compile_s = phase, seconds
    return self._say(f"{phase}: compiled and ran its first step in {seconds:.1f}s")

  def timed(self, phase: str, step_s: float) -> None:
    """The current phase's measured training seconds per step (evals excluded)."""
    self.clock.phase, self.clock.step_s = phase, step_s

  def eta(self, phase: str, done: int) -> str:
    """'eta 3m05s' over every phase and eval left ('~' where phases are not yet timed)."""
    k = self.clock
    if k.phase != phase or k.step_s is None:
      return ""
    # The first eval compiles; the later ones say what an eval costs.
    eval_s = k.eval_s[-1] if k.eval_s else 2 * k.step_s
    names = self.exp.phases
    left = (self.exp.steps[phase] - done) * k.step_s
    left += eval_s * sum(s > done for s in self.evals[phase])
    guessed = False
    per_flop = k.step_s / max(self.work[phase], 1.0)
    for p in names[names.index(phase) + 1 :]:
      guessed = True
      left += k.compile_s + self.exp.steps[p] * self.work[p] * per_flop
      left += eval_s * len(self.evals[p])
    return f"eta {'~' if guessed else ''}{format_duration(left)}"

  def logged(self, phase: str, done: int, row: dict, *, skipped: int = 0) -> str:
    """A progress line: step, loss, the measured rate (when `row` has one), the ETA over what is
    left of the run, and the non-finite steps skipped."""
    line = f"{phase} step {done}/{self.exp.steps[phase]}  loss {row['loss']:.4f}"
    if "steps_per_s" in row:
      line += f"  {row['steps_per_s']:.2f} steps/s  {row['tokens_per_s']:,.0f} tokens/s"
    names = self.exp.phases
    if done < self.exp.steps[phase] or names.index(phase) + 1 < len(names):
      line += f"  {self.eta(phase, done)}".rstrip()
    if skipped:
      line += f"  ({skipped} non-finite steps skipped)"
    return self._say(line)

  def evaluated(self, phase: str, done: int, metrics: dict, seconds: float, baseline: float):
    """One line: the RNN alone (and prompted), the teacher, the unigram baseline, in the data's
    unit (nats per target token), and the eval's own time."""
    first = not self.clock.eval_s
    self.clock.eval_s.append(seconds)
    m = metrics
    line = f"eval {phase} {done}/{self.exp.steps[phase]}: RNN {m['eval/rnn_nll']:.3f}"
    line += f" (acc {m['eval/rnn_acc']:.3f})"
    if "eval/rnn_prompted_nll" in m:
      line += f"  prompted {m['eval/rnn_prompted_nll']:.3f}"
    if "eval/teacher_nll" in m:
      line += f"  teacher {m['eval/teacher_nll']:.3f} (acc {m['eval/teacher_acc']:.3f})"
    line += f"  unigram {baseline:.3f} nats/{self.unit}"
    line += f"  [{seconds:.1f}s{', compile included' if first else ''}]"
    return self._say(line)

  def verdict(self, summary: dict, workdir: str, wall_s: float) -> str:
    """The end of a run: what each model scores after the last phase, against the baseline."""
    last = self.exp.phases[-1]
    m, base = summary.get(last, {}), summary["baseline/unigram_nll"]
    rows = [("RNN alone (its own memory from the start)", "eval/rnn_nll", "eval/rnn_acc")]
    rows += [("RNN prompted (from the teacher's memory)", "eval/rnn_prompted_nll", None)]
    rows += [("teacher (the RNN's target)", "eval/teacher_nll", "eval/teacher_acc")]
    lines = [
      f"Done in {format_duration(wall_s)} ({' -> '.join(self.exp.phases)}). Held-out NLL, nats "
      f"per {self.unit} (lower is better):"
    ]
    for label, nll, acc in rows:
      if nll in m:
        lines.append(
          f"  {label:<42} {m[nll]:.3f}" + (f"   acc {m[acc]:.3f}" if acc and acc in m else "")
        )
    lines.append(f"  {'unigram baseline (no memory at all)':<42} {base:.3f}")
    if "eval/rnn_nll" in m:
      gain = base - m["eval/rnn_nll"]
      lines.append(
        f"The RNN alone is {abs(gain):.3f} nats/{self.unit} "
        f"{'better' if gain >= 0 else 'WORSE'} than the baseline."
      )
    lines.append(f"Results in {workdir} (summary.json, metrics.jsonl, samples; tensorboard/).")
    return self._say("\n".join(lines))

  def _say(self, line: str) -> str:
    self.say(line)
    return line
