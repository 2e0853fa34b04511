"""Targets: what the user types after --target, and what it means to TVM and to the C++ compiler.

  x86 (default)   portable x86-64: the x86-64-v3 feature level (AVX2, FMA, BMI2; Intel Haswell /
                  AMD Zen 1 and later), so an artifact built on one x86 server runs on another
  native          this host's CPU (LLVM's host CPU, gcc -march=native): fastest here (AVX-512 VNNI
                  int8 where the host has it), may not run on another x86 CPU
  x86-64-v2/v3/v4 the x86-64 feature levels (SSE4.2 / AVX2+FMA / AVX-512)
  arm64           generic AArch64 with NEON (Armv8.0-A), runs on any 64-bit Arm Linux
  arm64-dotprod   Armv8.2-A with the dot-product extension (Neoverse N1, Cortex-A76 and later)
  sm80 (= cuda)   NVIDIA GPUs from Ampere on (A100, A10, RTX 30xx/40xx, H100): TVM schedules for
                  sm_80; device code compiled for sm_80 and sm_90
  sm90            Hopper (H100, H200): TVM schedules and device code for sm_90 only
A cuda target's host code is generic x86-64 (x86-64-v2), linked with g++; `device` is "cuda",
`gpu_archs` the architectures nvcc compiles device code for. tcc builds these artifacts but never
runs them (`runs_here` is False: tcc's runtime has no GPU path); see docs/CUDA.md.

`cpu_features` are the CPU flags (Linux /proc/cpuinfo names) the target's code may use; they go
into the manifest, and tcc.runtime refuses to load an artifact on a CPU that lacks one of them (a
clear error instead of an illegal-instruction crash). `describe()` lists the targets (`tcc targets`).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

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
    cpu_features: tuple = ()  # CPU flags (/proc/cpuinfo names) the code may use; checked at load

    def tvm_target(self):
        import tvm
        return tvm.target.Target(self.tvm)

    def to_json(self) -> dict:
        d = {"name": self.name, "arch": self.arch, "tvm": self.tvm, "cflags": list(self.cflags), "cc": self.cc}
        if self.qemu_cpu:
            d["qemu_cpu"] = self.qemu_cpu
        if self.device != "cpu":
            d["device"], d["gpu_archs"] = self.device, list(self.gpu_archs)
        if self.cpu_features:
            d["cpu_features"] = list(self.cpu_features)
        return d

    @property
    def missing_features(self) -> list[str]:
        """The target's CPU features this host lacks, when the library would run natively here."""
        return missing_cpu_features(self.to_json()) if self.arch == os.uname().machine else []

    @property
    def is_host(self) -> bool:
        """The library runs natively on this machine's CPU."""
        return self.device == "cpu" and self.arch == os.uname().machine and not self.missing_features

    @property
    def runs_here(self) -> bool:
        """tcc can run the artifact here: natively, or under qemu (arm64). Never for cuda, nor on a CPU
        without the target's features."""
        return self.device == "cpu" and not self.missing_features

    @property
    def why_not_run(self) -> str:
        """Why the artifact is not run here ("" when it is)."""
        if self.device != "cpu":
            return "no GPU on this host"
        missing = self.missing_features
        return f"this CPU lacks {', '.join(missing)}" if missing else ""


# The x86-64 feature levels as /proc/cpuinfo flags (pni is SSE3, abm is LZCNT).
X86_LEVELS = {
    "x86-64-v2": ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"),
}
X86_LEVELS["x86-64-v3"] = X86_LEVELS["x86-64-v2"] + ("abm", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave")
X86_LEVELS["x86-64-v4"] = X86_LEVELS["x86-64-v3"] + ("avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl")
# Further instruction-set extensions -march=native may use when the host has them.
X86_EXTENSIONS = ("adx", "aes", "amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_bitalg", "avx512_fp16",
                  "avx512_vbmi2", "avx512_vnni", "avx512_vpopcntdq", "avx512ifma", "avx512vbmi", "avx_vnni",
                  "clflushopt", "clwb", "fma4", "gfni", "pclmulqdq", "rdrand", "rdseed", "sha_ni", "sse4a", "vaes",
                  "vpclmulqdq", "xop", "xsavec", "xsaveopt")


def _x86(name: str, mcpu: str) -> Target:
    return Target(name, "x86_64", {"kind": "llvm", "mcpu": mcpu, "num-cores": os.cpu_count() or 1},
                  (f"-march={mcpu}",), "g++", cpu_features=X86_LEVELS[mcpu])


def _native() -> Target:
    """This host's CPU: LLVM's name for it, gcc -march=native, and the host's flags among the levels'
    and X86_EXTENSIONS as the features the artifact needs."""
    if os.uname().machine != "x86_64":
        raise UserError("--target native means this host's x86-64 CPU, and this host is not x86-64",
                        "use arm64 or arm64-dotprod, or an x86 preset (x86, x86-64-v2/v3/v4) to cross-compile")
    cpu = host_cpu()
    known = set(X86_LEVELS["x86-64-v4"]) | set(X86_EXTENSIONS)
    features = tuple(sorted(known & (host_cpu_features() or set())))
    if cpu in ("generic", ""):  # LLVM does not know this CPU
        return _x86("native", "x86-64-v2")
    return Target("native", "x86_64", {"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1},
                  ("-march=native",), "g++", cpu_features=features)


def _arm(name: str, mcpu: str, march: str, mattr: list[str], qemu_cpu: str) -> Target:
    features = ("asimd",) + (("asimddp",) if "+dotprod" in mattr else ())  # /proc/cpuinfo "Features"
    return Target(name, "aarch64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu, "mattr": mattr},
                  (f"-march={march}",), "aarch64-linux-gnu-g++", qemu_cpu, cpu_features=features)


def _cuda(name: str, sm: str, archs: tuple) -> Target:
    host = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v2"}
    return Target(name, "x86_64", {"kind": "cuda", "arch": sm, "host": host}, (), "g++", device="cuda",
                  gpu_archs=archs)


# name -> (one line for `tcc targets`, the Target)
TARGETS = {
    "x86": ("portable x86-64 (the x86-64-v3 level: AVX2, FMA; Intel Haswell, AMD Zen 1 and later); the default",
            lambda: _x86("x86", "x86-64-v3")),
    "native": ("this host's CPU (-march=native): fastest here, may not run on another x86 CPU", _native),
    "x86-64-v2": ("x86-64 with SSE4.2, POPCNT (any x86-64 server since about 2009)",
                  lambda: _x86("x86-64-v2", "x86-64-v2")),
    "x86-64-v3": ("x86-64 with AVX2, FMA, BMI2 (the same code as x86)", lambda: _x86("x86-64-v3", "x86-64-v3")),
    "x86-64-v4": ("x86-64 with AVX-512 F/BW/CD/DQ/VL (Intel Skylake-SP, AMD Zen 4 and later)",
                  lambda: _x86("x86-64-v4", "x86-64-v4")),
    "arm64": ("generic AArch64 with NEON (Armv8.0-A): any 64-bit Arm Linux; runs here under qemu",
              lambda: _arm("arm64", "generic", "armv8-a", ["+neon"], "cortex-a72")),
    "arm64-dotprod": ("Armv8.2-A with dot product (Neoverse N1, Graviton 2, Cortex-A76 and later)",
                      lambda: _arm("arm64-dotprod", "neoverse-n1", "armv8.2-a+dotprod", ["+neon", "+dotprod"],
                                   "neoverse-n1")),
    "sm80": ("NVIDIA GPUs from Ampere on (A100, A10, RTX 30xx/40xx, H100), alias cuda; built, not run here",
             lambda: _cuda("sm80", "sm_80", ("sm_80", "sm_90"))),
    "sm90": ("NVIDIA Hopper (H100, H200) only; built, not run here", lambda: _cuda("sm90", "sm_90", ("sm_90",))),
}
ALIASES = {"x86_64": "x86", "host": "native", "aarch64": "arm64", "arm64-v8.2": "arm64-dotprod",
           "neoverse-n1": "arm64-dotprod", "cuda": "sm80", "sm_80": "sm80", "sm_90": "sm90", "ampere": "sm80",
           "hopper": "sm90"}


def host_cpu_features() -> set[str] | None:
    """This CPU's feature flags (/proc/cpuinfo "flags" on x86, "Features" on Arm); None where the
    file says nothing (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def missing_cpu_features(target: dict) -> list[str]:
    """The manifest target's `cpu_features` this CPU lacks ([] when the host's flags are unknown)."""
    have = host_cpu_features()
    return [] if have is None else [f for f in target.get("cpu_features", []) if f not in have]


def check_cpu(target: dict, dir: Path | str = "the artifact") -> None:
    """UserError when this CPU lacks a feature the artifact's code uses: refused here instead of an
    illegal-instruction crash in the middle of a call."""
    missing = missing_cpu_features(target)
    if missing:
        raise UserError(f"{dir} was compiled for --target {target['name']} and needs CPU features this CPU lacks: "
                        f"{', '.join(missing)}",
                        "compile it again for a lower target: --target x86 (x86-64-v3, AVX2) or x86-64-v2, "
                        "or --target native on this machine (tcc targets lists them)")


def host_cpu() -> str:
    from tvm.target import codegen
    return str(codegen.llvm_get_system_cpu())


def get_target(name: str) -> Target:
    n = ALIASES.get(name.strip().lower(), name.strip().lower())
    if n in TARGETS:
        return TARGETS[n][1]()
    raise UserError(f"unknown target '{name}'", f"choose one of: {', '.join(TARGETS)} (tcc targets describes them)")


def describe() -> list[tuple[str, str]]:
    """[(name, one-line description)] of every target, the default first."""
    return [(name, line) for name, (line, _) in TARGETS.items()]
