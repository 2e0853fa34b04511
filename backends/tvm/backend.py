"""The `tvm` backend (tcc.pipeline.backend.Backend): a native library per target through Apache TVM, with
tcc's hand-written kernels (backends/kernels) called from it. Registered by tcc.backends.

Its parts: targets.py (what --target means), lower.py (Program -> Relax, dense ops to kernels),
schedule.py (CPU schedules), build.py (the library), cuda.py (cuda targets' device code), arm64.py
(cross-compiled libraries run under qemu), session.py (running artifacts).
"""
from __future__ import annotations

from pathlib import Path

from tcc.artifact import save_weights, weight_bytes
from tcc.memory import stage

from . import targets as _targets


class TVMBackend:
    name = "tvm"

    # -- targets -------------------------------------------------------------------------------
    def targets(self) -> list[tuple[str, str]]:
        return _targets.describe()

    def aliases(self) -> dict[str, str]:
        return dict(_targets.ALIASES)

    def target(self, name: str):
        return _targets.get_target(name)

    # -- building --------------------------------------------------------------------------------
    def check_toolchain(self, target) -> None:
        from .build import check_toolchain
        check_toolchain(target)

    def check_pipeline(self, pipeline, target) -> None:
        """What the lowering would refuse for `target` in `pipeline` (tcc.pipeline.backend), before the passes run."""
        if target.device == "cuda":
            from .lower import cuda_pipeline_refusal
            refusal = cuda_pipeline_refusal(pipeline)
            if refusal is not None:
                raise refusal

    def build(self, program, target, dir: Path, functions: dict | None = None) -> dict:
        """model.so and weights.safetensors in `dir`; the library dict (tcc.pipeline.backend.Backend.build)."""
        from .build import build_library
        sparsity: list[dict] = []
        device_code: dict = {}
        params, signatures = build_library(program, target, Path(dir) / "model.so", sparsity, device_code, functions)
        with stage("writing weights.safetensors"):
            save_weights(Path(dir) / "weights.safetensors", params)
        library = {"params": signatures["main"], "weight_bytes": weight_bytes(params), "sparsity": sparsity,
                   "functions": {name: {"inputs": [s.to_json() for s in prog.inputs],
                                        "outputs": [s.to_json() for s in prog.outputs], "params": signatures[name]}
                                 for name, prog in (functions or {}).items()}}
        if device_code:
            library["device_code"] = device_code
        return library

    def cacheable(self, target) -> bool:
        """Whether a built library may come from tcc.cache (cuda device code files are not cached)."""
        return target.runs_here

    def identity(self) -> list:
        import scipy_openblas32
        import tvm
        import tvm_ffi
        return [tvm.__version__, tvm_ffi.__version__, scipy_openblas32.__version__]

    def bundle(self, artifact_dir, out, force: bool = False) -> dict:
        """A self-contained native bundle of a built artifact (bundle.make_bundle: `tcc export --bundle`)."""
        from .bundle import make_bundle
        return make_bundle(artifact_dir, out, force=force)

    # -- running and costing -------------------------------------------------------------------------
    def session(self, dir, manifest: dict):
        from .session import session
        return session(Path(dir), manifest)

    def cost_model(self, program):
        """The program's graph as this backend will run it: dense ops as tcc's kernels (lower.kernelize)."""
        from .lower import kernelize
        return kernelize(program.gm, program.annotations)


BACKEND = TVMBackend()
