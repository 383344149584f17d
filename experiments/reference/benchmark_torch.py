"""Times the authors' PyTorch reference train steps (SMT, DMT, BPTT) at the bench config, on CPU.

Run it with the reference's environment (torch + x-transformers), from the repository root:

  /root/refvenv/bin/python -m experiments.reference.benchmark_torch --out=ref_speed.json
  $SMT_REF_PYTHON -m experiments.reference.benchmark_torch --phases=smt --steps=10 --threads=1

It imports the reference's own `model.py` from --ref_src (default:
`../shared/reference/smt-pytorch/src` relative to the repository root; nothing of it is copied here)
and never imports jax or smt_jax, so `experiments/__init__.py` must stay import-free. The models and
configs are those of `experiments/configs/bench.py`: vocab 17, d_model 64, 4 memory tokens (mem_size
256), 4 heads, teacher encoder depth 2 and decoder depth 1, RNN depth 2 and readout (RNN decoder)
depth 1, batch 32; SMT Tc 64, Tf 32 (T 96); DMT Tc 64, Td 32, Tf 32, k 4 (T 128); BPTT T 64.

One timed step is the training step of the reference's scripts, without their periodic no-grad
test pass, logging and checkpointing:

  smt  (train_smt.py)  AdamW over rnn + teacher parameters; zero_grad(set_to_none=True);
                        forward_smt; loss.backward(); clip_grad_norm_(rnn, 1);
                        clip_grad_norm_(teacher, 1); opt.step(); the scalar outputs' .item().
  dmt  (train_dmt.py)  AdamW over the RNN's parameters only (hot_teacher_* False); the same step
                        with forward_dmt. As in train_dmt.py the teacher's parameters keep
                        requires_grad, so backward also computes (and accumulates, never zeroed)
                        the teacher's gradients, and clip_grad_norm_ is called on both models.
  bptt (no script in the reference; train_smt.py's step with the RNN's parameters only)
                        forward_bptt; backward; clip_grad_norm_(rnn, 1); opt.step().
  dmt_frozen_teacher   (optional, not in the defaults) dmt with teacher.requires_grad_(False):
                        what the DMT step costs without the teacher backward pass.

The learning rate is set on the param groups every step as the scripts do (3e-4: warm-up over).
Under CUDA the scripts run the forward under bf16 autocast("cuda"); that autocast does nothing to
CPU tensors, so this is float32, as smt-jax's bench config. Batches are uniform random tokens
(x, y in [0, 17), y the next token, as the reference's datasets sample them); two are pre-built and
alternated. After --warmup untimed steps, --steps steps are timed one by one (wall clock and the
process's CPU seconds, all threads); the JSON holds per phase median_s, p25_s, p75_s, min_s,
cpu_s (median), steps, times_s (every timed step), and n_params_teacher, n_params_rnn, torch,
x_transformers, threads, omp_wait_policy, load_avg.

On a machine that other jobs load, torch's 2 OpenMP threads spin-wait for each other at every op
(the DMT and BPTT loops run thousands of tiny ops per step), and steps get 10-50x slower, with the
CPU time inflated alike; check load_avg, cpu_s and times_s. --omp_wait_policy=PASSIVE or
--threads=1 removes that pathology, but on an idle machine the default (2 threads, spinning) is the
fastest: measured there, PASSIVE is 1.6-1.8x slower, 1 thread 1.5-1.8x slower for SMT and DMT and
about equal for BPTT.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_REF_SRC = os.path.join(
  os.path.dirname(REPO_ROOT), "shared", "reference", "smt-pytorch", "src"
)
PHASES = ("smt", "dmt", "bptt", "dmt_frozen_teacher")
EXPECTED_PARAMS = {"teacher": 298833, "rnn": 298577}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=None, help="Write the results as JSON to this file.")
  p.add_argument(
    "--ref_src",
    "--ref-src",
    dest="ref_src",
    default=DEFAULT_REF_SRC,
    help="Folder holding the reference's model.py (default: %(default)s).",
  )
  p.add_argument(
    "--phases", default="smt,dmt,bptt", help=f"Comma-separated, from {','.join(PHASES)}."
  )
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads(N).")
  p.add_argument(
    "--omp_wait_policy",
    default=None,
    choices=["ACTIVE", "PASSIVE"],
    help="Set OMP_WAIT_POLICY before torch loads (default: leave the environment "
    "as it is). With 2 threads on a loaded machine, OpenMP's default spin-waiting "
    "can make the many small ops of the DMT and BPTT loops 10-50x slower; PASSIVE "
    "avoids that, but costs 1.6-1.8x on an idle machine (thread wake-ups).",
  )
  p.add_argument("--warmup", type=int, default=3, help="Untimed steps per phase.")
  p.add_argument("--steps", type=int, default=20, help="Timed steps per phase.")
  p.add_argument("--seed", type=int, default=0)
  # The bench config (experiments/configs/bench.py); flags so that a sweep can change them.
  p.add_argument("--vocab", type=int, default=17)
  p.add_argument("--d_model", type=int, default=64)
  p.add_argument("--mem_tokens", type=int, default=4)
  p.add_argument("--n_heads", type=int, default=4)
  p.add_argument("--encoder_depth", type=int, default=2)
  p.add_argument("--decoder_depth", type=int, default=1)
  p.add_argument("--rnn_depth", type=int, default=2)
  p.add_argument("--readout_depth", type=int, default=1)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--Tc", type=int, default=64)
  p.add_argument("--Tf", type=int, default=32)
  p.add_argument("--Td", type=int, default=32)
  p.add_argument("--dmt_k", type=int, default=4)
  p.add_argument("--bptt_T", type=int, default=64)
  p.add_argument("--lr", type=float, default=3e-4)
  p.add_argument("--weight_decay", type=float, default=1e-2)
  p.add_argument("--clip_grad_norm", type=float, default=1.0)
  a = p.parse_args(argv)
  a.phases = [s.strip() for s in a.phases.split(",") if s.strip()]
  bad = sorted(set(a.phases) - set(PHASES))
  if bad:
    p.error(f"--phases: unknown {bad}; choose from {list(PHASES)}")
  return a


def load_reference(ref_src: str):
  """Imports the reference's model.py (it imports only third-party modules)."""
  ref_src = os.path.abspath(ref_src)
  if not os.path.isfile(os.path.join(ref_src, "model.py")):
    sys.exit(f"--ref_src: no model.py in {ref_src}")
  if ref_src not in sys.path:
    sys.path.insert(0, ref_src)
  import model  # noqa: PLC0415 - the reference's module, found on --ref_src

  return model


def random_batch(gen, batch: int, seq_len: int, vocab: int):
  """x, y = tokens[:, :-1], tokens[:, 1:] (y the next token), as the reference's datasets."""
  import torch

  tok = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)
  return {"x": tok[:, :-1].contiguous(), "y": tok[:, 1:].contiguous()}


def count(module) -> int:
  return sum(p.numel() for p in module.parameters())


def build(ref, a):
  import torch

  torch.manual_seed(a.seed)
  mem_size = a.d_model * a.mem_tokens
  tcfg = ref.TeacherConfig(
    vocab_size=a.vocab,
    mem_size=mem_size,
    mem_tokens=a.mem_tokens,
    d_model=a.d_model,
    encoder_depth=a.encoder_depth,
    decoder_depth=a.decoder_depth,
    n_heads=a.n_heads,
  )
  rcfg = ref.RNNConfig(
    vocab_size=a.vocab,
    mem_size=mem_size,
    mem_tokens=a.mem_tokens,
    d_model=a.d_model,
    rnn_depth=a.rnn_depth,
    decoder_depth=a.readout_depth,
    n_heads=a.n_heads,
  )
  return ref.Teacher(tcfg), ref.RNN(rcfg), tcfg, rcfg


def make_step(ref, phase: str, teacher, rnn, a):
  """(step(batch) -> loss float, seq_len, phase config) for one phase, as the scripts train."""
  import torch

  if phase == "smt":
    cfg = ref.SMTConfig(T=a.Tc + a.Tf, Tc=a.Tc, Tf=a.Tf)
    params = []
    if cfg.hot_rnn:
      params += list(rnn.parameters())
    if cfg.hot_teacher:
      params += list(teacher.parameters())
    forward = lambda b: ref.forward_smt(rnn, teacher, b, cfg)  # noqa: E731
    clip = (rnn, teacher)
    seq_len = cfg.T
  elif phase in ("dmt", "dmt_frozen_teacher"):
    cfg = ref.DMTConfig(T=a.Tc + a.Td + a.Tf, Td=a.Td, Tc=a.Tc, Tf=a.Tf, k=a.dmt_k)
    assert not cfg.hot_teacher_encoder and not cfg.hot_teacher_decoder
    params = list(rnn.parameters()) if cfg.hot_rnn else []
    if phase == "dmt_frozen_teacher":
      teacher.requires_grad_(False)
    forward = lambda b: ref.forward_dmt(rnn, teacher, b, cfg)  # noqa: E731
    clip = (rnn, teacher)  # train_dmt.py clips both (and logs the teacher's norm)
    seq_len = cfg.T
  else:  # bptt
    cfg = ref.BPTTConfig(T=a.bptt_T)
    params = list(rnn.parameters())
    forward = lambda b: ref.forward_bptt(rnn, b, cfg)  # noqa: E731
    clip = (rnn,)
    seq_len = cfg.T
  opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.95))

  def step(batch):
    for group in opt.param_groups:  # util.get_lr after warm-up: the constant lr
      group["lr"] = a.lr
    rnn.train()
    teacher.train()
    opt.zero_grad(set_to_none=True)
    out = forward(batch)
    out["loss"].backward()
    norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), a.clip_grad_norm) for m in clip]
    opt.step()
    scalars = {k: v.detach().item() for k, v in out.items() if v.numel() == 1}
    for n in norms:
      n.item()
    return scalars["loss"]

  return step, seq_len, cfg


def percentile(xs, q):
  import numpy as np

  return float(np.percentile(np.asarray(xs), q))


def time_phase(ref, phase: str, a) -> dict:
  import torch

  teacher, rnn, _, _ = build(ref, a)  # fresh models per phase: no state carried between phases
  step, seq_len, cfg = make_step(ref, phase, teacher, rnn, a)
  gen = torch.Generator().manual_seed(a.seed + 1)
  batches = [random_batch(gen, a.batch, seq_len, a.vocab) for _ in range(2)]
  t0 = time.perf_counter()
  for i in range(a.warmup):
    step(batches[i % 2])
  warmup_s = time.perf_counter() - t0
  times, cpu = [], []
  loss = float("nan")
  for i in range(a.steps):
    t, c = time.perf_counter(), time.process_time()
    loss = step(batches[i % 2])
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return {
    "median_s": percentile(times, 50),
    "p25_s": percentile(times, 25),
    "p75_s": percentile(times, 75),
    "min_s": float(min(times)),
    "cpu_s": percentile(cpu, 50),
    "steps": a.steps,
    "warmup": a.warmup,
    "warmup_s": warmup_s,
    "times_s": times,
    "seq_len": seq_len,
    "batch_size": a.batch,
    "tokens_per_s": a.batch * seq_len / percentile(times, 50),
    "loss": loss,
    "phase_config": dataclasses.asdict(cfg),
  }


def main(argv=None):
  a = parse_args(argv)
  if a.omp_wait_policy:  # read by libgomp when torch loads it: must come before the import
    os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy
  import torch

  torch.set_num_threads(a.threads)
  ref = load_reference(a.ref_src)
  teacher, rnn, tcfg, rcfg = build(ref, a)
  n_t, n_r = count(teacher), count(rnn)
  print(
    f"Number of parameters: {n_t} in Teacher, {n_r} in RNN"
    f"{'' if (n_t, n_r) != tuple(EXPECTED_PARAMS.values()) else ' (as expected)'}",
    flush=True,
  )
  bench_shape = (
    a.vocab,
    a.d_model,
    a.mem_tokens,
    a.n_heads,
    a.encoder_depth,
    a.decoder_depth,
    a.rnn_depth,
    a.readout_depth,
  ) == (17, 64, 4, 4, 2, 1, 2, 1)
  if bench_shape and (n_t, n_r) != tuple(EXPECTED_PARAMS.values()):
    print(f"WARNING: expected {EXPECTED_PARAMS} at the bench config", flush=True)
  del teacher, rnn
  print(
    f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY "
    f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, batch {a.batch}, reference {a.ref_src}",
    flush=True,
  )

  results = {}
  print(
    f"{'phase':<20}{'median ms':>10}{'p25 ms':>9}{'p75 ms':>9}{'CPU ms':>9}{'tokens/s':>10}",
    flush=True,
  )
  for phase in a.phases:
    r = time_phase(ref, phase, a)
    results[phase] = r
    print(
      f"{phase:<20}{1e3 * r['median_s']:>10.1f}{1e3 * r['p25_s']:>9.1f}"
      f"{1e3 * r['p75_s']:>9.1f}{1e3 * r['cpu_s']:>9.1f}{r['tokens_per_s']:>10,.0f}",
      flush=True,
    )

  results.update(
    {
      "n_params_teacher": n_t,
      "n_params_rnn": n_r,
      "torch": torch.__version__,
      "x_transformers": importlib.metadata.version("x-transformers"),
      "threads": a.threads,
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
      "teacher_config": dataclasses.asdict(tcfg),
      "rnn_config": dataclasses.asdict(rcfg),
      "batch_size": a.batch,
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "load_avg": list(os.getloadavg()),
      "time": time.strftime("%Y-%m-%d %H:%M:%S"),
      "ref_src": os.path.relpath(os.path.abspath(a.ref_src), REPO_ROOT),
    }
  )
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {a.out}", flush=True)


if __name__ == "__main__":
  main()
