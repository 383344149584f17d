"""The device mesh and the shardings of parameters, optimiser state and batches.

One small vocabulary of mesh axes:
  data  the batch is split across it (data parallelism);
  fsdp  the batch is split across it too, and parameters and optimiser state are sharded over it
        (each array of at least `min_size` elements along its largest dimension that divides
        evenly; smaller arrays, e.g. biases and norm gains, stay replicated, as big_vision's
        `fsdp` rule: gathering them would cost more in latency than their memory saves);
  time  SMT's own axis: the vmapped transitions (time positions) are split across it, the
        parallelism BPTT cannot have.
Everything goes through `jax.jit` with `NamedSharding`s on this mesh (today's form of pjit).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "time")
BATCH_AXES = ("data", "fsdp")
# Arrays with fewer elements than this stay replicated on an fsdp mesh (64 KiB of float32): at the
# paper's width 256 the weight matrices (65,536+ elements) are sharded, biases and gains are not.
FSDP_MIN_SIZE = 2**14


def check_mesh_spec(spec: dict[str, int]) -> None:
  """Raises ValueError (naming the config field) unless `spec` is {axis: size >= 1 or -1 once}."""
  for k, v in spec.items():
    if k not in AXES:
      raise ValueError(f"config.mesh.{k} = {v!r}: unknown mesh axis; the axes are {list(AXES)}.")
    if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
      raise ValueError(
        f"config.mesh.{k} = {v!r}: a mesh axis size is a positive integer, or -1 "
        f"(once) for the rest."
      )
  if list(spec.values()).count(-1) > 1:
    raise ValueError(
      f"config.mesh = {spec!r}: at most one axis may be -1 (every device not used by the others)."
    )


def mesh_shape(spec: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Axis sizes for `spec` ({axis: size}, one size may be -1 = the rest) on `num_devices`."""
  check_mesh_spec(spec)
  sizes = [int(spec.get(a, 1)) for a in AXES]
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
        f"config.mesh: the fixed axes multiply to {known}, which does not divide the "
        f"{num_devices} devices; change config.mesh."
      )
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
      f"config.mesh: {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
      f"but {num_devices} are available; set one axis to -1 or fix the sizes."
    )
  return tuple(sizes)


def make_mesh(spec: dict[str, int]) -> Mesh:
  """The one place a mesh is built: axes (data, fsdp, time) over every device."""
  shape = mesh_shape(spec, jax.device_count())
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp: int, *, min_size: int = FSDP_MIN_SIZE) -> P:
  """Where an array of `shape` goes on an fsdp axis of size `fsdp`.

  Its largest dimension that `fsdp` divides is split (the first of equal ones); arrays of fewer
  than `min_size` elements, scalars, and arrays with no such dimension are replicated (`P()`).
  """
  if fsdp == 1 or not shape or math.prod(shape) < min_size:
    return P()
  dims = sorted(range(len(shape)), key=lambda i: -shape[i])  # stable: ties keep their order
  for i in dims:
    if shape[i] % fsdp == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()  # no dimension splits evenly: replicate


def state_shardings(tree: Any, mesh: Mesh, *, min_size: int = FSDP_MIN_SIZE) -> Any:
  """NamedShardings for params / optimiser state: `fsdp_spec` of each leaf on `mesh`."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(
    lambda a: NamedSharding(mesh, fsdp_spec(tuple(a.shape), fsdp, min_size=min_size)), tree
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches [B, T]: rows split over data x fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def time_constraint(mesh: Mesh) -> Callable[[jax.Array], jax.Array] | None:
  """A constraint putting the time-position axis (axis 1) of [B, N, ...] arrays on `time`.

  Under `jit`, N need not divide evenly (e.g. the T+1 teacher memories of T transitions: the last
  shard is padded); outside `jit` such arrays are left as they are. Rows stay split over the batch
  axes. None when the mesh has no time axis.
  """
  t = mesh.shape["time"]
  if t == 1:
    return None
  b = mesh.shape["data"] * mesh.shape["fsdp"]
  spec = NamedSharding(mesh, P(BATCH_AXES, "time"))

  def constrain(a: jax.Array) -> jax.Array:
    if a.ndim < 2 or a.shape[1] < t or a.shape[0] % b:
      return a
    if a.shape[1] % t and not isinstance(a, jax.core.Tracer):
      return a
    return jax.lax.with_sharding_constraint(a, spec)

  return constrain


def traced_on(mesh: Mesh, fn: Callable) -> Callable:
  """fn, traced with `mesh` as the current mesh whoever calls it: library code that asks for it
  (`jax.sharding.get_abstract_mesh()`, as `objectives.rollout` does) sees the mesh the jitted step
  runs on, not whatever the caller happened to set."""

  @functools.wraps(fn)
  def on_mesh(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return on_mesh


def start_together(mesh: Mesh, loss_fn: Callable) -> Callable:
  """loss_fn(params, batch, key), its parameters made to wait for one sum over the whole batch,
  so that on a multi-device CPU mesh every device starts its part of the step at once.

  XLA's CPU client runs all its devices' work on one shared pool of as many threads as cores, and
  a collective holds the thread that reaches it until every device has. The first device to start
  takes the whole pool; at its first collective (SMT: the batch's target counts, then the
  uniformity term's memories) one thread waits while the other runs the rest of that device's
  ready work before the second device's, so for much of the step one core works. Here each device
  first meets the others (an integer all-reduce over the batch, which XLA merges with the loss's
  own counts), and all the models' work depends on it through `p + 0 * count`: the same values up
  to float rounding (XLA may fuse the step differently). `lax.optimization_barrier` would say it
  more plainly, but XLA's CPU pipeline drops it before the thunks are scheduled. Other platforms
  and one-device meshes get loss_fn itself.
  """
  if mesh.size == 1 or mesh.devices.flat[0].platform != "cpu":
    return loss_fn

  @functools.wraps(loss_fn)
  def together(params, batch, key):
    count = jnp.sum(batch["x"][:, 0] >= 0).astype(jnp.float32)
    params = jax.tree.map(lambda p: p + (0 * count).astype(p.dtype), params)
    return loss_fn(params, batch, key)

  return together
