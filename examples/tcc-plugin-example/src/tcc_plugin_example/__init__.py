"""An example tcc pass plugin: `round-fp16` (see round_fp16.py), registered through the
"tcc.passes" entry-point group in pyproject.toml."""
