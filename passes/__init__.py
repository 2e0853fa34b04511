"""tcc's built-in passes, one module per pass; importing this package registers them all.

Find a pass by its CLI name: `dce` is dead_code.py, `fold-constants` fold_constants.py,
`smooth` smooth.py, `quantize` quantize.py, `quantize-weights` quantize_weights.py, `analyze-redundancy` analyze_redundancy.py,
`drop-attention` drop_attention.py, `drop-mlp` drop_mlp.py, `drop-blocks` drop_blocks.py, `heal` heal.py,
`prune-heads` prune_heads.py, `sparsify` sparsify.py, `prune-tokens` prune_tokens.py, `bf16` bf16.py,
`rotate` rotate.py.
"""
from . import dead_code, fold_constants, smooth, quantize, quantize_weights  # noqa: F401
from . import analyze_redundancy, drop_attention, drop_blocks, drop_mlp  # noqa: F401
from . import heal, prune_heads, prune_tokens, sparsify  # noqa: F401
from . import bf16  # noqa: F401
from . import rotate  # noqa: F401
