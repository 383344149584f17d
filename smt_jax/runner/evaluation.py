"""Held-out evaluation of a teacher/RNN pair: one pure function of (params, batch), `evaluate`,
and its sum over a run's eval batches, `held_out`."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from smt_jax import losses
from smt_jax.contract import Params, RNNFns, TeacherFns
from smt_jax.inference import read
from smt_jax.objectives import teacher_memories
from smt_jax.runner import experiment


@functools.partial(
  jax.jit, static_argnames=("rnn", "teacher", "context_length", "prompt_length", "future_length")
)
def evaluate(
  params: Params,
  batch: dict[str, jax.Array],
  *,
  rnn: RNNFns,
  teacher: TeacherFns | None = None,
  context_length: int | None = None,
  prompt_length: int = 0,
  future_length: int = 0,
) -> dict[str, jax.Array]:
  """Sums and counts over one eval batch (divide after summing over batches).

  rnn_*        the RNN read teacher-forced from its own initial memory (no teacher at all).
  prompted_*   the RNN started from the teacher's memory of the first `prompt_length` tokens.
  teacher_*    the teacher decoder's next-target prediction from m_t = E(x[t-Tc+1 .. t]), at every
               t (short, left-padded windows included).
  teacher_full_*  the same at full context only (t >= Tc-1: windows of Tc real tokens).
  teacher_decoding_*  the reference's evaluation: the decoder's Tf-step loss from E(x[0 .. Tc-1])
               against y[Tc-1 .. Tc+Tf-2] (its `loss_decoder` on held-out data; needs T >= Tc+Tf).
  drift_*      the RNN's own states vs the teacher's memories m_t along the sequence.

  Returns scalars: {rnn_nll_sum, rnn_correct_sum, count} and, with a teacher, {teacher_nll_sum,
  teacher_correct_sum, teacher_full_nll_sum, teacher_full_count, drift_mse, drift_1mr2 (per-batch
  means)}, with future_length > 0 {teacher_decoding_sum, teacher_decoding_count} and, with a
  prompt, {prompted_nll_sum, prompted_count}.
  """
  x, y = batch["x"], batch["y"]
  r = read(params, batch, rnn=rnn)
  out = {
    "rnn_nll_sum": jnp.sum(r["nll"]),
    "rnn_correct_sum": jnp.sum(r["correct"]),
    "count": jnp.sum(r["mask"]),
  }
  if teacher is None:
    return out
  tp = params["teacher"]
  mem = teacher_memories(teacher, tp, x, jnp.arange(x.shape[1]), context_length)
  # The decoder's first output (position K-1) predicts y[t] from m_t alone; the future input it is
  # fed cannot influence that position (causal mask).
  logits = jax.vmap(teacher.decode, in_axes=(None, 1, 1), out_axes=1)(tp, mem, x[:, :, None])
  t_nll, t_mask = losses.masked_cross_entropy(logits[:, :, 0], y)
  out["teacher_nll_sum"] = jnp.sum(t_nll)
  out["teacher_correct_sum"] = jnp.sum((jnp.argmax(logits[:, :, 0], -1) == y) & t_mask)
  full = t_mask & (jnp.arange(x.shape[1]) >= context_length - 1)
  out["teacher_full_nll_sum"] = jnp.sum(jnp.where(full, t_nll, 0.0))
  out["teacher_full_count"] = jnp.sum(full)
  if future_length and x.shape[1] >= context_length + future_length:
    tc, tf = context_length, future_length
    dec = teacher.decode(tp, mem[:, tc - 1], x[:, tc : tc + tf])
    d_nll, d_mask = losses.masked_cross_entropy(dec, y[:, tc - 1 : tc - 1 + tf])
    out["teacher_decoding_sum"], out["teacher_decoding_count"] = jnp.sum(d_nll), jnp.sum(d_mask)
  d = losses.drift(r["states"], mem)
  out["drift_mse"], out["drift_1mr2"] = d["mse"], d["one_minus_r2"]
  if prompt_length > 0:
    p = read(
      params,
      batch,
      rnn=rnn,
      teacher=teacher,
      context_length=context_length,
      prompt_length=prompt_length,
    )
    out["prompted_nll_sum"], out["prompted_count"] = jnp.sum(p["nll"]), jnp.sum(p["mask"])
  return out


def with_bits(metrics: dict[str, float], name: str) -> dict[str, float]:
  """`metrics` and, beside every '<x>_nll' (nats per target token), '<x>_<name>' = nll / ln 2."""
  out = dict(metrics)
  for k, v in metrics.items():
    if k.endswith("_nll"):
      out[k[: -len("nll")] + name] = v / math.log(2)
  return out


def held_out(exp: experiment.Experiment, params, *, with_teacher: bool) -> dict[str, float]:
  """The run's eval metrics ('eval/rnn_nll', ...) over its eval batches (`exp.eval_spec`).

  Every NLL (nats per target token) comes with its value in bits, named by the data
  (`Source.bits_unit`): 'eval/rnn_bits_per_dim' for pixels, 'eval/rnn_bits_per_byte' for byte-level
  text, 'eval/rnn_bits_per_token' otherwise. Pixel streams with a BOS token count its targets
  too (1 in H*W + 1 tokens), as the NLL does."""
  s, source = exp.eval_spec, exp.source_at("eval")
  tfns, rfns = exp.fns
  totals: dict[str, float] = {}
  for i in range(s.num_batches):
    batch = exp.batch(source, split="eval", step=i, batch_size=s.batch_size)
    out = evaluate(
      params,
      batch,
      rnn=rfns,
      teacher=tfns if with_teacher else None,
      context_length=s.context_length,
      prompt_length=s.prompt_length if with_teacher else 0,
      future_length=s.future_length if with_teacher else 0,
    )
    for k, v in jax.device_get(out).items():
      totals[k] = totals.get(k, 0.0) + float(v)

  def mean(total: str, count: str) -> float:
    return totals[total] / max(totals[count], 1)

  res = {
    "eval/rnn_nll": mean("rnn_nll_sum", "count"),
    "eval/rnn_acc": mean("rnn_correct_sum", "count"),
  }
  if with_teacher:
    res["eval/teacher_nll"] = mean("teacher_nll_sum", "count")
    res["eval/teacher_acc"] = mean("teacher_correct_sum", "count")
    res["eval/teacher_full_nll"] = mean("teacher_full_nll_sum", "teacher_full_count")
    if "teacher_decoding_sum" in totals:
      res["eval/teacher_decoding_nll"] = mean("teacher_decoding_sum", "teacher_decoding_count")
    res["eval/drift_mse"] = totals["drift_mse"] / s.num_batches
    res["eval/drift_1mr2"] = totals["drift_1mr2"] / s.num_batches
    if "prompted_nll_sum" in totals:
      res["eval/rnn_prompted_nll"] = mean("prompted_nll_sum", "prompted_count")
  return with_bits(res, source.bits_unit)


def unigram_nll(exp: experiment.Experiment) -> float:
  """Entropy (nats) of the eval targets' own distribution: the bar a model must clear."""
  s, source = exp.eval_spec, exp.source_at("eval")
  counts = np.zeros(source.vocab_size)
  for i in range(s.num_batches):
    y = source.batch(split="eval", step=i, batch_size=s.batch_size, seed=s.seed)["y"]
    counts += np.bincount(y[y >= 0], minlength=source.vocab_size)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())
