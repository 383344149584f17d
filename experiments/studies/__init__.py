"""The studies that reproduce the paper's measurements (docs/method.md section 9), one module each.

Each module has `run(ctx) -> dict` (ctx: `common.Context`), trains through the real runner (reusing
finished runs) and writes <out>/<study>.png and <out>/studies/<study>.{json,md}. The name -> run
table is `registry.STUDIES`; `python -m experiments.studies` (__main__.py) runs them.
"""
