"""Pixel-sequence modelling: images as raster-scan token streams (docs/method.md section 8).

Arguments (`--config=experiments/configs/pixels.py:ARG`):
  digits (default)  scikit-learn's bundled 8x8 handwritten digits (17 intensity levels), a CPU-sized
                    model, 8 transitions per row from one causal-teacher pass, DMT from the RNN's
                    own initial memory (where the RNN alone is evaluated); SMT then DMT in 3 min
                    22 s to 4 min 11 s on a 2-core CPU (2026-12-06, the whole process; the RNN
                    alone at 1.440-1.470 nats/pixel on 3 seeds), no network.
  mnist             28x28 MNIST, 256 levels, via tensorflow-datasets (or IDX files in
                    --config.data.path), streamed as the authors do (vocab 256, no BOS); the
                    paper's model and schedules (docs/method.md section 6) and the reference recipe
                    (`common.reference_recipe`): the authors' published run.
  sketch            a folder of PNG/JPEG line drawings in --config.data.path (the paper's
                    sketches: the Sketchy database, https://sketchy.eye.gatech.edu; unpack its
                    sketches and point data.path at e.g. rendered_256x256/256x256/sketch/
                    tx_000000000000, one subfolder per category), turned grayscale, resized
                    to 28x28 by area averaging, inverted (strokes bright on black, as MNIST) and
                    kept at 256 levels (data.options.image_folder.image_size / levels /
                    invert); about 1 in 10 images (by a hash of the file name) evaluate unless
                    --config.data.eval_path names a folder. The model, schedules and stream of
                    mnist.
  quickdraw         Quick, Draw! bitmaps: --config.data.path is a numpy_bitmap/<category>.npy file
                    or a folder of them (download from https://quickdraw.withgoogle.com/data,
                    i.e. gs://quickdraw_dataset/full/numpy_bitmap/; uint8 [N, 784] 28x28);
                    data.options.quickdraw.categories="cat,dog" picks some, max_per_category
                    (20000) bounds how many of each are read; the last 10% of those evaluate.
                    As mnist.
  smoke             digits with a tiny model and a few steps (seconds; used by the tests).
  ARG,reference     any of these with the reference recipe (e.g. digits,reference).
  digits,earlier    the default until 2026-12-06: 2 transitions per row from the windowed
                    teacher, Tf 16 (3 seeds: 1.505 +- 0.023 nats/pixel against the default's
                    1.460 +- 0.011 in the same train seconds, docs/results.md 2d).
  digits,full       full supervision: every memory of a row trained from one causal-teacher pass,
                    with cosine decay; Tf 8 with 16 memories decoded per row, the recipe search's
                    winner (README, "Full supervision"; at 1M tokens 1.641 +- 0.039 nats against
                    Tf 16 with 8 decoded's 1.711 +- 0.045 and BPTT's 1.490 +- 0.007, 3 seeds:
                    docs/results.md 0d). Its step costs 3-4x the default's on a CPU
                    (docs/benchmarks.md). SMT lr 3e-3, DMT 9e-4, the best at 1M tokens (the
                    race, section 0) and at the default budget (4.1M tokens, 2d): 1.417 +- 0.012
                    nats there against BPTT's 1.304 +- 0.012, 3 seeds (docs/results.md 2d).
  ARG,smoke         sketch or quickdraw with smoke's tiny model and budget (e.g. quickdraw,smoke).
Digits keep a BOS before every image (`data.options.digits.bos`) so the RNN alone can start one.

Commands:
  python -m experiments.run --config=experiments/configs/pixels.py
  python -m experiments.run --config=experiments/configs/pixels.py:mnist \\
      --config.model.dtype=bfloat16
  python -m experiments.run --config=experiments/configs/pixels.py:mnist \\
      --config.data.path=/data/mnist
  python -m experiments.run --config=experiments/configs/pixels.py --config.phases=bptt
  python -m experiments.run --config=experiments/configs/pixels.py:digits,reference
  python -m experiments.run --config=experiments/configs/pixels.py:sketch \\
      --config.data.path=/data/sketchy/sketch/tx_000000000000
  python -m experiments.run --config=experiments/configs/pixels.py:quickdraw \\
      --config.data.path=/data/quickdraw/numpy_bitmap \\
      --config.data.options.quickdraw.categories=cat,dog
  python -m experiments.sample --workdir=runs/pixels_digits
"""

from experiments.configs import common
from smt_jax.runner import config as config_lib


def get_config(arg: str = "digits"):
  arg, *flags = arg.split(",")
  known = {"reference", "smoke", "full", "earlier"}
  if set(flags) - known:
    raise ValueError(
      f"pixels.py: unknown flags {sorted(set(flags) - known)}; the flags are 'reference' (e.g. "
      f"pixels.py:digits,reference), 'full', 'earlier' and 'smoke'."
    )
  common.check_recipe_flags("pixels.py", arg, flags, ("digits", "smoke"))
  c = config_lib.default()
  if arg in ("digits", "smoke"):
    c.data.name = "digits"
    c.data.options.digits.bos = True
    common.cpu_model(c)
    c.smt.steps = 1_500
    c.smt.batch_size = 32
    c.smt.lr = 1e-3
    c.smt.context_length = 64  # about one image (65 tokens with its BOS)
    c.smt.future_length = 16
    c.dmt.steps = 300
    c.dmt.batch_size = 16
    c.dmt.lr = 3e-4
    if "full" in flags:
      common.full_supervision_stream(c)
      c.smt.lr, c.dmt.lr = 3e-3, 9e-4
    else:
      # Heads of width / heads = 16 (2.4x the SMT steps/s of 64-wide heads here), lr 3e-3 with
      # cosine decay: the main job in under 5 minutes on 2 cores (docs/benchmarks.md).
      c.model.head_dim = 16
      c.smt.lr, c.smt.schedule, c.dmt.lr = 3e-3, "cosine", 1e-3
      # The default until 2026-12-06; `,reference` keeps its Tf 16 (reference_recipe sets the rest).
      if {"earlier", "reference"} & set(flags):
        c.smt.num_transitions = 2
      else:
        # 8 of a row's 72 transitions from one causal-teacher pass, Tf 8: a step no dearer than
        # 2 windowed transitions' and 0.045 nats better on 3 seeds (docs/results.md 2d). Every
        # transition (`,full`) is better still per token, at 6x the seconds.
        c.model.teacher_kind = "causal"
        c.smt.future_length = 8
        c.smt.num_transitions = 8
        # DMT from the RNN's own initial memory, where the RNN alone is evaluated and sampled
        # (docs/results.md 2d: better on 3 seeds, on 8% fewer tokens).
        c.dmt.streams_from_rnn_initial_memory = True
    c.dmt.rollout_length = 64
    c.dmt.label_every = 8
    c.bptt.steps = 1_500
    c.bptt.batch_size = 32
    c.bptt.lr = 1e-3
    c.bptt.seq_len = 128
    c.eval.every_steps = 1_500  # each phase's end
    c.eval.first_step = 50  # the first numbers within the first minute
    c.eval.batch_size = 32
    c.eval.num_batches = 4
    c.eval.seq_len = 130  # two whole images
    c.eval.prompt_length = 65
    c.log_every_steps = 100
    c.checkpoint_every_steps = 500
    c.samples.temperature = 0.8
    if arg == "smoke":
      common.smoke(c)
  elif arg in ("mnist", "sketch", "quickdraw"):
    c.data.name = {"mnist": "mnist", "sketch": "image_folder", "quickdraw": "quickdraw"}[arg]
    # The authors' stream: every image's 784 pixels in row-major order, back to back with no
    # separator, vocabulary exactly 256; rows are random windows of it (train: the 60k train
    # images, eval: the 10k test images).
    c.data.options[c.data.name].bos = False
    c.smt.context_length = 256
    c.smt.future_length = 64
    c.eval.seq_len = 1568  # two images' worth of tokens (784 each; windows start anywhere)
    c.eval.prompt_length = 784 + 392  # an image's worth, then half of one more
    c.bptt.seq_len = 320
  else:
    raise ValueError(
      f"pixels.py: unknown argument {arg!r}; use digits, mnist, sketch, quickdraw or smoke."
    )
  if arg != "digits" and arg != "smoke" or "reference" in flags:
    common.reference_recipe(c)
  if "smoke" in flags:
    common.smoke(c)
  return c
