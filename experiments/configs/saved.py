"""A run's own config, read back from its workdir: continue or extend a run without retyping the
overrides it was started with.

  python -m experiments.run --config=runs/pixels_digits --config.dmt.steps=600

`--config=<workdir>` (a local folder holding config.json) stands for
`--config=experiments/configs/saved.py:<workdir>`, and the workdir defaults to that folder; any
`--config.<field>=...` override applies on top, as with every config file. A config saved by an
older version has the fields that have moved since where they are now (`config.migrate`), so an
override names today's field.
"""

import json
import os

import ml_collections

from smt_jax.runner import config as config_lib


def get_config(workdir: str):
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"saved.py: {path} does not exist; pass the workdir of a run.")
  with open(path) as f:
    return ml_collections.ConfigDict(config_lib.migrate(json.load(f)))
