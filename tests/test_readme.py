"""The README's "use the losses in your own project" snippet runs as written and trains."""

import os
import re

import jax
import numpy as np

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _snippet() -> str:
  text = open(README).read()
  section = text[text.index("## Using the losses in your own project") :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs_and_its_gradient_trains():
  ns = {}
  exec(compile(_snippet(), "README.md", "exec"), ns)  # noqa: S102 - our own README
  loss, metrics = ns["loss"], ns["metrics"]
  assert np.isfinite(float(loss))
  assert set(metrics) >= {"decoding_loss", "dynamics_loss", "uniformity_loss"}

  # The same function differentiates: a few SGD steps on it lower the loss.
  import smt_jax

  f = lambda p: smt_jax.smt_loss(
    p,
    ns["batch"],
    ns["k"][3],
    teacher=smt_jax.teacher_fns(ns["graphdef"]),
    rnn=ns["my_rnn"],
    context_length=16,
    future_length=8,
    num_transitions=24,
  )[0]
  params = {"teacher": ns["teacher_params"], "rnn": ns["rnn_params"]}

  @jax.jit
  def value_and_step(p):
    value, grads = jax.value_and_grad(f)(p)
    return value, jax.tree.map(lambda a, g: a - 0.05 * g, p, grads)

  first, params = value_and_step(params)
  for _ in range(20):
    last, params = value_and_step(params)
  assert float(last) < float(first)


def test_the_contract_error_the_readme_quotes_is_what_smt_loss_says():
  """The snippet's cell, returning its flat [B, K*D] state, gives the README's one line."""
  import pytest

  import smt_jax

  ns = {}
  exec(compile(_snippet(), "README.md", "exec"), ns)  # noqa: S102 - our own README
  text = open(README).read()
  quoted = re.search(r"one-line error \(`(smt_loss: .*?)`\)", text, re.S).group(1)
  quoted = re.sub(r"\s*\n\s*", " ", quoted)  # the README wraps it
  flat = ns["my_rnn"]._replace(
    update=lambda p, m, x: ns["update"](p, m, x).reshape(len(x), -1)  # [B, K*D]
  )
  with pytest.raises(ValueError) as e:
    smt_jax.smt_loss(
      {"teacher": ns["teacher_params"], "rnn": ns["rnn_params"]},
      ns["batch"],
      ns["k"][3],
      teacher=smt_jax.teacher_fns(ns["graphdef"]),
      rnn=flat,
      context_length=16,
      future_length=8,
      num_transitions=24,
    )
  assert str(e.value) == quoted
