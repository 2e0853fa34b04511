"""tcc — a transformer compression compiler.

    import tcc
    program = tcc.trace("minilm", seq_len=128)           # HF folder, .gguf, alias, or nn.Module
    pipe = tcc.Pipeline.parse("dce,quantize-weights(bits=8)")
    art = tcc.compile(program, "x86", out="build/minilm", pipeline=str(pipe))
    outputs = tcc.load("build/minilm")({"input_ids": ..., "attention_mask": ...})
"""
from .version import __version__  # noqa: E402,F401

import os as _os

# TVM sizes its thread pool once, at first use, assuming hyper-threading on x86 (half the cores):
# on a 2-core machine that is one thread, and the dense kernels run on that pool. Use every core
# unless the user said otherwise.
_os.environ.setdefault("TVM_NUM_THREADS", str(len(_os.sched_getaffinity(0)) if hasattr(_os, "sched_getaffinity") else _os.cpu_count() or 1))

from .errors import AccuracyBudgetError, InternalError, TccError, UserError  # noqa: E402,F401


def __getattr__(name):
    # Lazy: importing tcc must stay cheap (the CLI prints help without importing torch or TVM).
    if name == "trace":
        from .frontends.frontend import trace
        return trace
    if name == "compile":
        from .compiler import compile
        return compile
    if name == "load":
        from .runtime import load
        return load
    if name in ("Pipeline", "Pass", "PassContext", "register"):
        from . import pipeline
        return getattr(pipeline, name)
    if name == "Program":
        from .ir.program import Program
        return Program
    raise AttributeError(name)
