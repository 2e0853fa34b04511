"""Where a decode step's time goes: every call the Relax VM makes in one `decode` of a compiled
artifact, timed and summed by callee (sessions 17, 20).

    python benchmarks/step_profile.py ARTIFACT_DIR [--prompt 128] [--steps 200] [--top 25]

Prefills the first --prompt tokens of wikitext-2 test.txt (SmolLM2's tokenizer, as
benchmarks/generation.py), decodes a few tokens, then runs the decode function --steps times plain
(the step's wall time) and --steps times with `VirtualMachine.set_instrument` given a C++ callback
(built here with g++ against TVM-FFI's headers) that reads a steady clock before and after each call:
it adds 0.2-0.3 us a call (a Python callback added about 1 us, more than many of the calls it
timed). Prints per callee (the dense kernels split by their weight's shape) the microseconds a step,
the calls a step and the microseconds a call, and the time between calls (the VM's own work, the
callback included). TVM_NUM_THREADS: 2 unless set.
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--steps", type=int, default=200)
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
    report = native_instrument(vm)
    step = vm["decode_bound"]
    for _ in range(3):
        step()
    report(reset=True)
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    instrumented = (time.perf_counter() - t) / a.steps
    rows, gaps = report()
    total = sum(ns for ns, _ in rows.values())
    print(f"{a.artifact}: decode step at position {pos}, {os.environ['TVM_NUM_THREADS']} threads: "
          f"{plain * 1e3:.3f} ms plain, {instrumented * 1e3:.3f} ms instrumented; "
          f"{sum(n for _, n in rows.values()) // a.steps} calls a step summing to {total / a.steps / 1e6:.3f} ms, "
          f"{gaps / a.steps / 1e3:.1f} us between them")
    print("| callee | us a step | calls a step | us a call |")
    print("| --- | ---: | ---: | ---: |")
    for key, (ns, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:a.top]:
        print(f"| {key} | {ns / a.steps / 1e3:.1f} | {n // a.steps} | {ns / n / 1e3:.2f} |")
    art.close()
    return 0


INSTRUMENT = r"""
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>
#include <chrono>
#include <map>
#include <string>
namespace {
struct Acc { int64_t ns = 0, calls = 0; };
std::map<std::string, Acc> acc;
std::chrono::steady_clock::time_point t0, last_end;
int64_t gaps = 0;
bool started = false;
std::string key(tvm::ffi::PackedArgs args) {
  std::string name = args[1].cast<tvm::ffi::String>();
  if (name.rfind("tcc_dense_", 0) == 0 && args.size() > 5) {  // a dense kernel: by its weight's shape
    if (auto w = args[5].try_cast<tvm::ffi::TensorView>()) {
      name += " (";
      for (int d = 0; d < w->ndim(); ++d) name += (d ? ", " : "") + std::to_string(w->size(d));
      name += ")";
    }
  }
  return name;
}
}  // namespace
TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef().def_packed("step_profile.instrument", [](tvm::ffi::PackedArgs args, tvm::ffi::Any* rv) {
    const auto now = std::chrono::steady_clock::now();
    if (args[2].cast<bool>()) {  // before the call
      if (started) gaps += std::chrono::duration_cast<std::chrono::nanoseconds>(now - last_end).count();
      t0 = std::chrono::steady_clock::now();
    } else {
      Acc& a = acc[key(args)];
      a.ns += std::chrono::duration_cast<std::chrono::nanoseconds>(now - t0).count();
      a.calls += 1;
      started = true;
      last_end = std::chrono::steady_clock::now();
    }
    *rv = 0;
  });
  refl::GlobalDef().def("step_profile.report", [](bool reset) -> tvm::ffi::String {
    std::string out = std::to_string(gaps) + "\n";
    for (auto& [k, a] : acc) out += k + "\t" + std::to_string(a.ns) + "\t" + std::to_string(a.calls) + "\n";
    if (reset) acc.clear(), gaps = 0, started = false;
    return out;
  });
}
"""


def native_instrument(vm):
    """Build INSTRUMENT, load it, set it as `vm`'s instrument; returns report(reset=False) -> ({callee: (ns,
    calls)}, ns between calls) since the last reset."""
    import ctypes
    import subprocess
    import tempfile
    from pathlib import Path

    import tvm_ffi
    from tvm_ffi import libinfo
    with tempfile.TemporaryDirectory(prefix="step_profile-") as tmp:  # (a loaded library outlives its file)
        out = Path(tmp)
        (out / "instrument.cc").write_text(INSTRUMENT)
        cmd = ["g++", "-O2", "-shared", "-fPIC", "-std=c++17", f"-I{libinfo.find_include_path()}",
               f"-I{libinfo.find_dlpack_include_path()}", str(out / "instrument.cc"), "-o", str(out / "instrument.so"),
               libinfo.find_libtvm_ffi()]
        subprocess.run(cmd, check=True)
        ctypes.CDLL(str(out / "instrument.so"), mode=ctypes.RTLD_GLOBAL)
    vm.set_instrument(tvm_ffi.get_global_func("step_profile.instrument"))
    get = tvm_ffi.get_global_func("step_profile.report")

    def report(reset: bool = False):
        lines = str(get(reset)).splitlines()
        rows = {}
        for line in lines[1:]:
            name, ns, calls = line.rsplit("\t", 2)
            rows[name] = (int(ns), int(calls))
        return rows, int(lines[0])
    return report


if __name__ == "__main__":
    sys.exit(main())
