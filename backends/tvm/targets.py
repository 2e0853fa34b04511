"""Targets: what the user types after --target, and what it means to TVM and to the C++ compiler.

  x86             the host CPU (features detected through LLVM: `llvm_get_system_cpu()`)
  x86-64-v2/v3/v4 portable x86-64 feature levels (SSE4.2 / AVX2+FMA / AVX-512)
  arm64           generic AArch64 with NEON (Armv8.0-A), runs on any 64-bit Arm Linux
  arm64-dotprod   Armv8.2-A with the dot-product extension (Neoverse N1, Cortex-A76 and later)
  sm80 (= cuda)   NVIDIA GPUs from Ampere on (A100, A10, RTX 30xx/40xx, H100): TVM schedules for
                  sm_80; device code compiled for sm_80 and sm_90
  sm90            Hopper (H100, H200): TVM schedules and device code for sm_90 only
A cuda target's host code is generic x86-64 (x86-64-v2), linked with g++; `device` is "cuda",
`gpu_archs` the architectures nvcc compiles device code for. tcc builds these artifacts but never
runs them (`runs_here` is False: tcc's runtime has no GPU path); see docs/CUDA.md.
"""
from __future__ import annotations

import dataclasses
import os

from tcc.errors import UserError


@dataclasses.dataclass(frozen=True)
class Target:
    name: str            # what the user typed (canonical)
    arch: str            # "x86_64" | "aarch64"
    tvm: dict            # JSON dict for tvm.target.Target
    cflags: tuple        # for the hand-written kernels
    cc: str              # C compiler that links the library
    qemu_cpu: str = ""   # the CPU qemu-aarch64 emulates to run it here: the target's own features,
                         # not qemu's default "max" (with SVE/SME), on which OpenBLAS picks kernels
                         # that computed wrong results under qemu
    device: str = "cpu"  # "cpu" | "cuda": where the model's kernels run
    gpu_archs: tuple = ()  # cuda: the SASS architectures compiled, e.g. ("sm_80", "sm_90")

    def tvm_target(self):
        import tvm
        return tvm.target.Target(self.tvm)

    def to_json(self) -> dict:
        d = {"name": self.name, "arch": self.arch, "tvm": self.tvm, "cflags": list(self.cflags), "cc": self.cc}
        if self.qemu_cpu:
            d["qemu_cpu"] = self.qemu_cpu
        if self.device != "cpu":
            d["device"], d["gpu_archs"] = self.device, list(self.gpu_archs)
        return d

    @property
    def is_host(self) -> bool:
        """The library runs natively on this machine's CPU."""
        return self.device == "cpu" and self.arch == os.uname().machine

    @property
    def runs_here(self) -> bool:
        """tcc can run the artifact here: natively, or under qemu (arm64). Never for cuda."""
        return self.device == "cpu"


def _x86(name: str, mcpu: str) -> Target:
    return Target(name, "x86_64", {"kind": "llvm", "mcpu": mcpu, "num-cores": os.cpu_count() or 1},
                  (f"-march={mcpu}",), "g++")


def _arm(name: str, mcpu: str, march: str, mattr: list[str], qemu_cpu: str) -> Target:
    return Target(name, "aarch64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu, "mattr": mattr},
                  (f"-march={march}",), "aarch64-linux-gnu-g++", qemu_cpu)


def _cuda(name: str, sm: str, archs: tuple) -> Target:
    host = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v2"}
    return Target(name, "x86_64", {"kind": "cuda", "arch": sm, "host": host}, (), "g++", device="cuda",
                  gpu_archs=archs)


PRESETS = {
    "x86-64-v2": lambda: _x86("x86-64-v2", "x86-64-v2"),
    "x86-64-v3": lambda: _x86("x86-64-v3", "x86-64-v3"),
    "x86-64-v4": lambda: _x86("x86-64-v4", "x86-64-v4"),
    "arm64": lambda: _arm("arm64", "generic", "armv8-a", ["+neon"], "cortex-a72"),
    "arm64-dotprod": lambda: _arm("arm64-dotprod", "neoverse-n1", "armv8.2-a+dotprod", ["+neon", "+dotprod"], "neoverse-n1"),
    "sm80": lambda: _cuda("sm80", "sm_80", ("sm_80", "sm_90")),
    "sm90": lambda: _cuda("sm90", "sm_90", ("sm_90",)),
}
ALIASES = {"x86_64": "x86", "aarch64": "arm64", "arm64-v8.2": "arm64-dotprod", "neoverse-n1": "arm64-dotprod",
           "cuda": "sm80", "sm_80": "sm80", "sm_90": "sm90", "ampere": "sm80", "hopper": "sm90"}


def host_cpu() -> str:
    from tvm.target import codegen
    return str(codegen.llvm_get_system_cpu())


def get_target(name: str) -> Target:
    n = ALIASES.get(name.strip().lower(), name.strip().lower())
    if n == "x86":
        if os.uname().machine != "x86_64":
            raise UserError("--target x86 means this host's CPU, and this host is not x86-64",
                            "use a preset: x86-64-v3 or x86-64-v4")
        cpu = host_cpu()
        t = _x86("x86", cpu)
        return dataclasses.replace(t, cflags=("-march=native",) if cpu not in ("generic", "") else ("-march=x86-64-v2",))
    if n in PRESETS:
        return PRESETS[n]()
    raise UserError(f"unknown target '{name}'", "choose one of: x86, " + ", ".join(PRESETS))
