"""The reference implementation's weights in smt-jax's models, and back.

`from_state_dicts` builds the same NNX `Teacher` and transformer RNN the runner builds and fills
them with the weights of the authors' PyTorch models, given as `{state_dict name: numpy array}`
(e.g. `{k: v.numpy() for k, v in teacher.state_dict().items()}`); `to_state_dicts` goes the other
way. Nothing here imports torch. The name correspondence (`docs/parity.md`):

  embed.weight                        teacher.embed.embedding          (shared by encoder, decoder)
  encoder_mem_register.weight         teacher.registers
  <stack>.layers.{2i}.0.0.g           <stack>.blocks[i].attn_norm.g
  <stack>.layers.{2i}.1.to_{q,k,v}    <stack>.blocks[i].attn.qkv.kernel  (W.T, columns [q | k | v])
  <stack>.layers.{2i}.1.to_out        <stack>.blocks[i].attn.out.kernel  (absent with one head)
  <stack>.layers.{2i+1}.0.0.g         <stack>.blocks[i].mlp_norm.g
  <stack>.layers.{2i+1}.1.ff.0.0      <stack>.blocks[i].fc1              (weight.T, bias)
  <stack>.layers.{2i+1}.1.ff.2        <stack>.blocks[i].fc2
  <stack>.final_norm.g                <stack>.final_norm.g
  <stack>.rotary_pos_emb.inv_freq     (a buffer: checked against layers.rotary_inv_freq)
  to_logits.{weight,bias}             decoder.to_logits

with <stack> the teacher's `encoder` (ours: teacher.encoder) and `decoder` (teacher.decoder.
transformer), and the RNN's `rnn` (rnn.rnn) and `decoder` (rnn.decoder.transformer).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from smt_jax.models import layers
from smt_jax.models.rnn import TransformerRNN
from smt_jax.models.teacher import DEFAULT_HEAD_DIM, Teacher

StateDict = Mapping[str, np.ndarray]


def _stack_entries(stack: layers.Transformer, prefix: str) -> dict[str, nnx.Param]:
  """{reference name: our parameter} for one Transformer stack ('<prefix>.layers.<i>.1.qkv'
  stands for the three to_q/to_k/to_v weights, joined as the fused kernel's columns)."""
  out = {}
  for i, block in enumerate(stack.blocks):
    a, f = f"{prefix}.layers.{2 * i}", f"{prefix}.layers.{2 * i + 1}"
    out[f"{a}.0.0.g"] = block.attn_norm.g
    out[f"{a}.1.qkv"] = block.attn.qkv.kernel  # three names: split / joined below
    if block.attn.out is not None:
      out[f"{a}.1.to_out.weight"] = block.attn.out.kernel
    out[f"{f}.0.0.g"] = block.mlp_norm.g
    out[f"{f}.1.ff.0.0.weight"] = block.fc1.kernel
    out[f"{f}.1.ff.0.0.bias"] = block.fc1.bias
    out[f"{f}.1.ff.2.weight"] = block.fc2.kernel
    out[f"{f}.1.ff.2.bias"] = block.fc2.bias
  out[f"{prefix}.final_norm.g"] = stack.final_norm.g
  return out


def _entries(
  teacher: Teacher | None, rnn: TransformerRNN | None
) -> dict[str, dict[str, nnx.Param]]:
  """{'teacher' / 'rnn': {reference name: our parameter}} for the models given."""
  res = {}
  if teacher is not None:
    t = {
      "embed.weight": teacher.embed.embedding,
      "encoder_mem_register.weight": teacher.registers,
      "to_logits.weight": teacher.decoder.to_logits.kernel,
      "to_logits.bias": teacher.decoder.to_logits.bias,
    }
    t.update(_stack_entries(teacher.encoder, "encoder"))
    t.update(_stack_entries(teacher.decoder.transformer, "decoder"))
    res["teacher"] = t
  if rnn is not None:
    r = {
      "embed.weight": rnn.embed.embedding,
      "to_logits.weight": rnn.decoder.to_logits.kernel,
      "to_logits.bias": rnn.decoder.to_logits.bias,
    }
    r.update(_stack_entries(rnn.rnn, "rnn"))
    r.update(_stack_entries(rnn.decoder.transformer, "decoder"))
    res["rnn"] = r
  return res


def _transposed(name: str) -> bool:
  """Whether a reference entry is a Linear weight ([out, in]; our kernels are [in, out])."""
  return name.endswith(".weight") and not name.startswith(("embed.", "encoder_mem_register."))


def _stacks(model: str) -> tuple[str, ...]:
  return ("encoder", "decoder") if model == "teacher" else ("rnn", "decoder")


def _load(params: dict[str, nnx.Param], state: StateDict, model: str, head_dim: int) -> None:
  state = {k: np.asarray(v) for k, v in state.items()}
  expected = set()
  for name, param in params.items():
    if name.endswith(".1.qkv"):
      base = name[: -len("qkv")]
      names = [f"{base}to_{p}.weight" for p in "qkv"]
      expected.update(names)
      missing = [n for n in names if n not in state]
      if missing:
        raise ValueError(f"{model} state_dict lacks {missing[0]!r} (and {len(missing) - 1} more).")
      value = np.concatenate([state[n].T for n in names], axis=1)
    else:
      expected.add(name)
      if name not in state:
        raise ValueError(
          f"{model} state_dict lacks {name!r}: is it the reference's {model} at "
          f"these depths and head count?"
        )
      value = state[name].T if _transposed(name) else state[name]
    if value.shape != param[...].shape:
      raise ValueError(
        f"{model} state_dict {name!r} has shape {state.get(name, value).shape}, "
        f"the model expects {param[...].shape} (transposed for Linear weights): "
        f"check vocab_size, width, num_heads and num_memory_tokens."
      )
    param[...] = jnp.asarray(value, param[...].dtype)
  inv_freq = np.asarray(layers.rotary_inv_freq(head_dim))
  for stack in _stacks(model):
    key = f"{stack}.rotary_pos_emb.inv_freq"
    expected.add(key)
    if key in state and not np.allclose(state[key], inv_freq, rtol=1e-6, atol=0):
      raise ValueError(
        f"{model} {key} differs from this model's rotary frequencies "
        f"(head_dim {head_dim}, base {layers.ROPE_BASE})."
      )
  extra = sorted(set(state) - expected)
  if extra:
    raise ValueError(
      f"{model} state_dict has {len(extra)} entries this model does not have, "
      f"e.g. {extra[0]!r}: check the depths and num_heads."
    )


def build(
  *,
  vocab_size: int,
  width: int,
  num_heads: int,
  num_memory_tokens: int,
  encoder_depth: int,
  decoder_depth: int,
  rnn_depth: int,
  readout_depth: int,
  head_dim: int = DEFAULT_HEAD_DIM,
  dtype=jnp.float32,
  seed: int = 0,
) -> tuple[Teacher, TransformerRNN]:
  """The teacher and transformer RNN at the reference's architecture (initial memory: zeros)."""
  rngs = nnx.Rngs(seed)
  teacher = Teacher(
    vocab_size=vocab_size,
    num_memory_tokens=num_memory_tokens,
    width=width,
    encoder_depth=encoder_depth,
    decoder_depth=decoder_depth,
    num_heads=num_heads,
    head_dim=head_dim,
    dtype=dtype,
    rngs=rngs,
  )
  rnn = TransformerRNN(
    vocab_size=vocab_size,
    num_memory_tokens=num_memory_tokens,
    width=width,
    depth=rnn_depth,
    num_heads=num_heads,
    readout_depth=readout_depth,
    head_dim=head_dim,
    initial_memory="zeros",
    dtype=dtype,
    rngs=rngs,
  )
  return teacher, rnn


def from_state_dicts(
  teacher_state: StateDict | None,
  rnn_state: StateDict | None,
  *,
  vocab_size: int,
  width: int,
  num_heads: int,
  num_memory_tokens: int,
  encoder_depth: int,
  decoder_depth: int,
  rnn_depth: int,
  readout_depth: int,
  dtype=jnp.float32,
) -> tuple[Teacher, TransformerRNN]:
  """The reference's teacher and RNN as smt-jax NNX modules holding its weights.

  Args:
    teacher_state, rnn_state: `{PyTorch state_dict name: array}` of the reference's `Teacher` and
      `RNN` (None leaves that model at its fresh initialisation). The `inv_freq` buffers, if
      present, are checked against this model's rotary frequencies.
    vocab_size .. readout_depth: the reference's TeacherConfig / RNNConfig fields (`d_model` is
      `width`, `n_heads` is `num_heads`, `mem_tokens` is `num_memory_tokens`, the RNN's
      `decoder_depth` is `readout_depth`).

  Returns:
    (teacher, rnn): `Teacher` and `TransformerRNN` with head_dim 64 and a zero initial memory.
  Raises:
    ValueError naming the first missing, extra or mis-shaped entry.
  """
  teacher, rnn = build(
    vocab_size=vocab_size,
    width=width,
    num_heads=num_heads,
    num_memory_tokens=num_memory_tokens,
    encoder_depth=encoder_depth,
    decoder_depth=decoder_depth,
    rnn_depth=rnn_depth,
    readout_depth=readout_depth,
    dtype=dtype,
  )
  entries = _entries(teacher, rnn)
  for model, state in (("teacher", teacher_state), ("rnn", rnn_state)):
    if state is not None:
      _load(entries[model], state, model, DEFAULT_HEAD_DIM)
  return teacher, rnn


def to_state_dicts(
  teacher: Teacher | None, rnn: TransformerRNN | None
) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray] | None]:
  """The inverse of `from_state_dicts`: `{PyTorch state_dict name: float32 numpy array}` for each
  model (None for a model not given), `inv_freq` buffers included, loadable into the reference
  with `load_state_dict({k: torch.from_numpy(v) ...})`."""
  entries = _entries(teacher, rnn)
  out = {}
  for model, module in (("teacher", teacher), ("rnn", rnn)):
    if module is None:
      out[model] = None
      continue
    state = {}
    for name, param in entries[model].items():
      value = np.asarray(param[...], np.float32)
      if name.endswith(".1.qkv"):
        base = name[: -len("qkv")]
        for p, part in zip("qkv", np.split(value, 3, axis=1)):
          state[f"{base}to_{p}.weight"] = np.ascontiguousarray(part.T)
      elif _transposed(name):
        state[name] = np.ascontiguousarray(value.T)
      else:
        state[name] = value
    stack = module.encoder if model == "teacher" else module.rnn
    inv_freq = np.asarray(layers.rotary_inv_freq(stack.head_dim), np.float32)
    for s in _stacks(model):
      state[f"{s}.rotary_pos_emb.inv_freq"] = inv_freq
    out[model] = state
  return out["teacher"], out["rnn"]
