"""Artifacts: what `tcc compile` writes and `tcc.load` runs.

A directory:
  model.so            the compiled library (TVM Relax VM executable + tcc kernels) for the target;
                      its function `main(*inputs, *params)` returns the outputs
  weights.safetensors the parameters, stored in their compiled dtypes (int8 where quantised)
  manifest.json       tcc version, source model and its hash, pipeline with options, target,
                      input/output specs, parameter order, per-pass records, sizes, sha256 of every
                      file; everything that varies between two identical compiles (time of day,
                      seconds taken, host) is kept in the one field "run"
  tokenizer/          (generation artifacts) the tokenizer, saved by transformers' save_pretrained
  report.md           a short human report; report.json and report.html: the full report (tcc.report);
                      none of the three is hashed in the manifest (they hold timings that differ
                      between compiles)
  build.log           what the libraries tcc called (TVM, PyTorch, transformers) printed while
                      compiling, kept off the terminal (tcc --debug shows it there); not hashed
It is written to a temporary sibling directory and renamed into place, so a failed compile leaves
no half-written artifact; an existing artifact at the path is replaced only on success. Anything
else at the path (a file, a directory that is not empty and not a tcc artifact) is refused unless
`force` (tcc.paths): tcc never deletes what it did not write.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import UserError
from .paths import check_dir, read_small_json

FORMAT = "tcc-artifact/1"
UNHASHED = ("manifest.json", "report.json", "report.html", "report.md", "build.log")  # the reports hold timings
WHAT = "output directory (-o)"


from .frontends.models import file_sha256 as sha256


def is_artifact(dir: Path) -> bool:
    """Whether `dir` holds a tcc artifact (its manifest.json has tcc's format, any version)."""
    m = read_small_json(Path(dir) / "manifest.json")
    return m is not None and str(m.get("format", "")).startswith(FORMAT.split("/")[0] + "/")


class Staging:
    """A temporary directory beside `out` that becomes `out` on commit(). `out` may only be missing,
    an empty directory or a tcc artifact unless `force` (tcc.paths); checked now and again on commit."""

    def __init__(self, out: Path, force: bool = False, what: str = WHAT, tcc_wrote=is_artifact):
        self.force, self.what, self.tcc_wrote = force, what, tcc_wrote  # what / tcc_wrote: tcc.paths.check_dir's
        out = Path(os.path.abspath(out))
        self.out = check_dir(out.parent.resolve() / out.name, what, tcc_wrote, force)  # a link is replaced, not followed
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))

    def commit(self) -> Path:
        os.chmod(self.dir, 0o755)  # mkdtemp (and safetensors) make files private; an artifact is ordinary
        for f in self.dir.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() or f.suffix == ".so" or f.stat().st_mode & 0o100 else 0o644)
        check_dir(self.out, self.what, self.tcc_wrote, self.force)  # nothing new appeared there meanwhile
        old = None
        if os.path.lexists(self.out):
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.dir, self.out)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:  # a file or link the user let --force replace
                old.unlink(missing_ok=True)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def save_weights(path: Path, params: list[tuple[str, np.ndarray]]) -> None:
    from safetensors.numpy import save_file
    # ascontiguousarray makes a 0-d array (a scalar buffer: Gemma's embed_scale) 1-d; keep its shape
    save_file({name: np.ascontiguousarray(a).reshape(a.shape) for name, a in params}, str(path))


def write_manifest(dir: Path, manifest: dict, run: dict) -> dict:
    manifest = dict(manifest)
    manifest["format"] = FORMAT
    manifest["files"] = {f.relative_to(dir).as_posix(): sha256(f) for f in sorted(Path(dir).rglob("*"))
                         if f.is_file() and f.name not in UNHASHED}
    manifest["run"] = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **run}
    (dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(dir: Path) -> dict:
    dir = Path(dir)
    if not dir.exists():
        raise UserError(f"artifact '{dir}' not found", "give the directory `tcc compile -o` wrote")
    path = dir / "manifest.json"
    if not path.exists():
        raise UserError(f"{dir} is not a tcc artifact (no manifest.json)", "give the directory `tcc compile -o` wrote")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is corrupt: {e}", "compile the model again")
    if m.get("format") != FORMAT:
        raise UserError(f"{dir} has artifact format {m.get('format')!r}, this tcc reads {FORMAT}", "compile the model again")
    return m


def verify_files(dir: Path, manifest: dict) -> None:
    for f, digest in manifest.get("files", {}).items():
        p = Path(dir) / f
        if not p.exists():
            raise UserError(f"artifact {dir} is missing {f}", "compile the model again")
        if f != "report.md" and sha256(p) != digest:
            raise UserError(f"artifact file {p} does not match its sha256 in manifest.json (corrupt or modified)",
                            "compile the model again")


def weight_bytes(params: list[tuple[str, np.ndarray]]) -> int:
    return int(sum(a.nbytes for _, a in params))
