"""Samples a person can look at: digit grids, generated text, probe accuracy tables.

What they read of the config is `exp.sample_spec` (`experiment.SampleSpec`).
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np

from smt_jax import inference, storage
from smt_jax.data import PixelSource, ProbeSource, TextSource
from smt_jax.runner import multihost


def on_process_zero(exp, params, draw):
  """`draw(exp, params)` on process 0 alone (None on the others), from parameters gathered onto
  its host first: with several processes they may be sharded across them, and sampling from
  those alone would wait forever for the others. Every process calls it."""
  local = multihost.host_local(params)
  if jax.process_index() != 0:
    return None
  with multihost.on_this_host(exp.mesh):
    return draw(exp, local)


def write_samples(exp, params, workdir: str, summary: dict | None = None) -> list[str]:
  """Writes the samples suited to the dataset into `workdir`; returns the paths written."""
  key = jax.random.key(exp.sample_spec.seed + 1)
  if isinstance(exp.source, PixelSource):
    return [pixel_samples(exp, params, key, storage.join(workdir, "samples.png"))]
  if isinstance(exp.source, TextSource):
    return [text_samples(exp, params, key, storage.join(workdir, "samples.txt"))]
  if isinstance(exp.source, ProbeSource):
    return [probe_table(summary or {}, storage.join(workdir, "accuracy.md"))]
  return []


def _generate(exp, params, key, prompts: np.ndarray, num_steps: int, *, use_teacher: bool):
  """Tokens [N, num_steps] sampled by the RNN after reading `prompts` [N, P]."""
  tfns, rfns = exp.fns
  memory = inference.prompt_memory(
    params,
    jnp.asarray(prompts),
    rnn=rfns,
    teacher=tfns if use_teacher else None,
    context_length=exp.sample_spec.context_length,
  )
  return np.asarray(
    inference.write(
      params, key, memory, rnn=rfns, num_steps=num_steps, temperature=exp.sample_spec.temperature
    )
  )


def pixel_rows(exp, params, key) -> list[tuple[str, np.ndarray]]:
  """(name, images float [N, H, W] in [0, 1]) rows: real eval digits | the RNN alone (from BOS)
  | RNN completions of real top halves.

  Completions start from the teacher's memory of the top half when the run trained a teacher,
  else from the RNN's own rollout over it. A stream without BOS marks no image start, so there
  every prompt begins with the whole eval image before (`PixelSource.image_prefix`) instead.
  """
  src = exp.source
  n = exp.sample_spec.num
  h, w = src.image_shape
  real = np.asarray(src.images("eval")[:n])
  prefix = src.image_prefix("eval", n)  # [BOS], or the image before (no BOS)
  k1, k2 = jax.random.split(key)
  alone = _generate(exp, params, k1, prefix, h * w, use_teacher=False)
  half = (h // 2) * w
  top = np.concatenate([prefix, real.reshape(n, -1)[:, :half].astype(np.int32)], axis=1)
  rest = _generate(exp, params, k2, top, h * w - half, use_teacher="smt" in exp.phases)
  completed = np.concatenate([top[:, prefix.shape[1] :], rest], axis=1)

  def to_img(tokens):  # a sampled BOS inside an image shows as background
    t = np.where(tokens >= src.levels, 0, tokens)
    return t.reshape(-1, h, w) / (src.levels - 1)

  return [
    ("real", real / (src.levels - 1)),
    ("RNN alone", to_img(alone)),
    ("RNN completes top half", to_img(completed)),
  ]


def image_grid(rows: list[tuple[str, np.ndarray]], *, gap: int = 1) -> np.ndarray:
  """The rows' images tiled into one float [H', W'] picture, `gap` pixels of 0.5 between them."""
  n = max(len(imgs) for _, imgs in rows)
  h, w = rows[0][1].shape[1:]
  out = np.full((len(rows) * (h + gap) - gap, n * (w + gap) - gap), 0.5, np.float32)
  for r, (_, imgs) in enumerate(rows):
    for i, img in enumerate(imgs):
      out[r * (h + gap) : r * (h + gap) + h, i * (w + gap) : i * (w + gap) + w] = img
  return out


def pixel_samples(exp, params, key, path: str) -> str:
  """`pixel_rows` drawn as a labelled figure at `path`."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = exp.sample_spec.num
  h = exp.source.image_shape[0]
  rows = pixel_rows(exp, params, key)
  fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.8, len(rows) * 0.95), squeeze=False)
  for r, (name, imgs) in enumerate(rows):
    for i in range(n):
      ax = axes[r, i]
      ax.imshow(imgs[i], cmap="gray", vmin=0, vmax=1)
      ax.set_xticks([]), ax.set_yticks([])
      if r == 2:
        ax.axhline(h // 2 - 0.5, color="red", lw=0.6)
    axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
  fig.suptitle(f"{exp.sample_spec.rnn_kind} RNN, phases {','.join(exp.phases)}", fontsize=8)
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
  plt.close(fig)
  storage.write_bytes(path, png.getvalue())
  return path


def text_lines(exp, params, key, length: int = 300) -> list[str]:
  """Stories written by the RNN alone and continuations of eval prompts, as lines."""
  src = exp.source
  n = min(exp.sample_spec.num, 4)
  k1, k2 = jax.random.split(key)
  start = np.full((n, 1), ord("\n"), np.int32)
  alone = _generate(exp, params, k1, start, length, use_teacher=False)
  prompt_len = max(1, min(exp.sample_spec.context_length, 128))
  prompts = src.batch(split="eval", step=0, batch_size=n, seed=exp.sample_spec.seed)["x"][
    :, :prompt_len
  ]
  cont = _generate(exp, params, k2, prompts, length, use_teacher="smt" in exp.phases)
  lines = ["# Samples from the RNN alone (starting after a newline)\n"]
  for i in range(n):
    lines += [f"--- sample {i}", src.decode(alone[i]), ""]
  lines.append("# Continuations of eval prompts (prompt | continuation)\n")
  for i in range(n):
    lines += [f"--- prompt {i}", src.decode(prompts[i]) + " | " + src.decode(cont[i]), ""]
  return lines


def text_samples(exp, params, key, path: str, length: int = 300) -> str:
  """`text_lines` written to `path`."""
  storage.write_text(path, "\n".join(text_lines(exp, params, key, length)))
  return path


def eval_samples(exp, params) -> dict[str, tuple[str, object]]:
  """Samples for TensorBoard at an eval: {tag: ('image', float [H, W]) | ('text', markdown)}.

  The same key at every eval (that of `write_samples`), so successive evals differ only by the
  parameters. Probes have none (their samples are the final accuracy table).
  """
  key = jax.random.key(exp.sample_spec.seed + 1)
  if isinstance(exp.source, PixelSource):
    return {"samples/pixels": ("image", image_grid(pixel_rows(exp, params, key)))}
  if isinstance(exp.source, TextSource):
    # Indented: TensorBoard renders markdown, where four spaces keep the text verbatim.
    lines = text_lines(exp, params, key)
    return {"samples/text": ("text", "\n".join("    " + line for line in lines))}
  return {}


def probe_table(summary: dict, path: str) -> str:
  """A markdown table of the final eval accuracy and NLL after each phase."""
  lines = ["| phase | RNN acc | RNN NLL | teacher acc | teacher NLL |", "|---|---|---|---|---|"]
  for phase in ("smt", "dmt", "bptt"):
    m = summary.get(phase)
    if not isinstance(m, dict):
      continue
    fmt = lambda k: f"{m[k]:.4f}" if k in m else "-"
    lines.append(
      f"| {phase} | {fmt('eval/rnn_acc')} | {fmt('eval/rnn_nll')} | "
      f"{fmt('eval/teacher_acc')} | {fmt('eval/teacher_nll')} |"
    )
  storage.write_text(path, "\n".join(lines) + "\n")
  return path
