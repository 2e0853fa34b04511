"""tcc's built-in passes, one module per pass; importing this package registers them all.

Find a pass by its CLI name: `dce` is dead_code.py, `fold-constants` fold_constants.py,
`quantize-weights` quantize_weights.py.
"""
from . import dead_code, fold_constants, quantize_weights  # noqa: F401
