"""Where a decode step's time goes: every call the Relax VM makes in one `decode` of a compiled
artifact, timed and summed by callee (session 17).

    python benchmarks/step_profile.py ARTIFACT_DIR [--prompt 128] [--steps 20] [--top 25]

Prefills the first --prompt tokens of wikitext-2 test.txt (SmolLM2's tokenizer, as
benchmarks/generation.py), decodes a few tokens, then runs the decode function --steps times plain
(the step's wall time) and --steps times with `VirtualMachine.set_instrument` (a Python callback
before and after each call: it adds about 1 us a call, so the instrumented sum exceeds the plain
step). Prints per callee (the W4A8 / W8A8 dense kernels split by their weight's shape) the
microseconds a step and the calls a step. TVM_NUM_THREADS: 2 unless set.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np

os.environ.setdefault("TVM_NUM_THREADS", "2")
from generation import prompt_ids  # noqa: E402  benchmarks/generation.py


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    import tvm
    from tvm import relax

    import tcc
    from tcc.generation import prefill_prompt
    from tcc.ir.program import TensorSpec
    art = tcc.load(a.artifact)
    session = art.session()
    ids = prompt_ids(a.prompt)
    prefill_prompt(session.prefill, ids, session.chunk, session.max_context)
    pos = len(ids)
    for _ in range(4):
        session.decode(17, pos)
        pos += 1
    impl, sig = art._impl, art.manifest["generation"]["functions"]["decode"]
    specs = [TensorSpec.from_json(d) for d in sig["inputs"]][:len(sig["inputs"]) - len(session.caches)]
    values = [np.array([[17]]), np.array([pos]), np.array([0])]
    inputs = [tvm.runtime.tensor(np.asarray(v, dtype=s.dtype).reshape(s.shape)) for s, v in zip(specs, values)]
    vm = relax.VirtualMachine(impl.lib, tvm.cpu())
    vm.save_function("decode", "decode_bound", *inputs, *session.caches, *[impl._param(n) for n in sig["params"]])
    step = vm["decode_bound"]  # the same position every call: the cache row is rewritten, the work the same
    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    plain = (time.perf_counter() - t) / a.steps
    total, calls, start = collections.Counter(), collections.Counter(), {}

    def instrument(func, name, before, ret, *args):
        now = time.perf_counter()
        key = name
        if name.startswith("tcc_dense_") and len(args) > 1 and hasattr(args[1], "shape"):
            key = f"{name} {tuple(args[1].shape)}"
        if before:
            start[key] = now
        else:
            total[key] += now - start[key]
            calls[key] += 1

    vm.set_instrument(instrument)
    step = vm["decode_bound"]
    for _ in range(a.steps):
        step()
    print(f"{a.artifact}: decode step at position {pos}, {os.environ['TVM_NUM_THREADS']} threads: "
          f"{plain * 1e3:.3f} ms plain; instrumented, {sum(calls.values()) // a.steps} calls a step summing to "
          f"{sum(total.values()) / a.steps * 1e3:.3f} ms")
    print("| callee | us a step | calls a step |")
    print("| --- | ---: | ---: |")
    for key, v in total.most_common(a.top):
        print(f"| {key} | {v / a.steps * 1e6:.1f} | {calls[key] // a.steps} |")
    art.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
