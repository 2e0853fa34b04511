"""Output paths (tcc.paths): tcc never deletes or overwrites what it did not write.

For each path a user names for tcc to write - `compile -o`, `--report`, `--search-dir` and the
search's `-o`, a pass's `out=`, `run -o`, `analyze -o` - three cases: something tcc did not write is
there (exit 2 naming the path, the hint `--force`, the user's file untouched, nothing written; these
fail before any model is loaded, so they cost next to nothing), tcc's own earlier output is there
(replaced without `--force`), and `--force`. Models: a random-init BERT (conftest `tiny_bert_dir`)
at seq-len 8, compiled without verification or latency where the point is only the path.
"""
from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
from test_cli import assert_user_error, tcc_cli

from tcc.cli import main
from tcc.errors import UserError

PRECIOUS = "precious\n"
FAST = ["--seq-len", "8", "--no-verify", "--no-latency"]


@pytest.fixture
def important(tmp_path) -> Path:
    """The issue's folder: `mkdir important && echo precious > important/notes.txt`."""
    d = tmp_path / "important"
    d.mkdir()
    (d / "notes.txt").write_text(PRECIOUS)
    return d


@pytest.fixture
def mine(tmp_path) -> Path:
    """A user's own file where tcc is asked to write one."""
    f = tmp_path / "mine.json"
    f.write_text(PRECIOUS)
    return f


def untouched(important: Path) -> None:
    assert sorted(os.listdir(important)) == ["notes.txt"] and (important / "notes.txt").read_text() == PRECIOUS


def cli(capsys, *args) -> tuple[int, str]:
    """`tcc ARGS` in this process (cheaper than a subprocess): (exit code, stderr)."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def refused(code: int, err: str, path: Path) -> None:
    """Exit 2, one error naming `path` and saying why, the --force hint, and no model was loaded."""
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("tcc: error: ")]
    assert len(errors) == 1 and str(path) in errors[0] and "did not write" in errors[0], err
    assert "hint: choose another path, or pass --force" in err, err
    assert "loading" not in err and "tracing" not in err, err


# -- the issue, as a user types it --------------------------------------------------------------------------

def test_compile_refuses_a_folder_it_did_not_write(tmp_path, important, tiny_bert_dir):
    r = tcc_cli("compile", tiny_bert_dir, "--seq-len", 16, "-o", important)
    line = assert_user_error(r, str(important), "non-empty directory tcc did not write")
    assert "hint: choose another path, or pass --force" in r.stderr, r.stderr
    untouched(important)
    assert sorted(os.listdir(tmp_path)) == ["important"]  # no staging sibling left behind
    assert "tracing" not in r.stderr, line


# -- refusals: every writer, before any work ----------------------------------------------------------------

REFUSALS = {
    "compile -o": lambda m, d, f, t: (["compile", m, *FAST, "-o", d], d),
    "compile --report": lambda m, d, f, t: (["compile", m, *FAST, "-o", t / "out", "--report", f], f),
    "compile pass out=": lambda m, d, f, t: (["compile", m, *FAST, "-o", t / "out", "-p",
                                              f"analyze-redundancy(out={d})"], d),
    "search -o": lambda m, d, f, t: (["compile", m, "--seq-len", 8, "--max-accuracy-drop", "1%", "-o", d], d),
    "search --search-dir": lambda m, d, f, t: (["compile", m, "--seq-len", 8, "--max-accuracy-drop", "1%",
                                                "-o", t / "out", "--search-dir", d], d),
    "search --report": lambda m, d, f, t: (["compile", m, "--seq-len", 8, "--max-accuracy-drop", "1%",
                                            "-o", t / "out", "--report", f], f),
    "analyze -o": lambda m, d, f, t: (["analyze", m, "--seq-len", 8, "-o", d], d),
    "run -o": lambda m, d, f, t: (["run", t / "no-artifact-needed", "--inputs", t / "in.npz", "-o", f], f),
}


@pytest.mark.parametrize("writer", list(REFUSALS))
def test_refused_before_any_work(writer, tmp_path, important, mine, tiny_bert_dir, capsys):
    args, target = REFUSALS[writer](tiny_bert_dir, important, mine, tmp_path)
    refused(*cli(capsys, *args), target)
    untouched(important)
    assert mine.read_text() == PRECIOUS
    assert sorted(os.listdir(tmp_path)) == ["important", "mine.json"]  # no out, no search dir, no temp file


def test_a_users_npz_is_not_tccs(tmp_path, capsys):
    """`tcc run -o` replaces only an .npz it wrote itself (marked in the zip comment), not any .npz."""
    theirs = tmp_path / "theirs.npz"
    np.savez(theirs, x=np.arange(3))
    before = theirs.read_bytes()
    refused(*cli(capsys, "run", tmp_path / "art", "--inputs", tmp_path / "in.npz", "-o", theirs), theirs)
    assert theirs.read_bytes() == before


@pytest.mark.parametrize("argv", [["compile", "MODEL", *FAST, "-o", "OUT", "--report", "DIR", "--force"],
                                  ["run", "ART", "--inputs", "IN", "-o", "DIR", "--force"]])
def test_a_file_output_never_replaces_a_directory(argv, tmp_path, important, tiny_bert_dir, capsys):
    names = {"MODEL": tiny_bert_dir, "OUT": tmp_path / "out", "DIR": important, "ART": tmp_path / "a",
             "IN": tmp_path / "in.npz"}
    code, err = cli(capsys, *[names.get(a, a) for a in argv])
    assert code == 2 and f"{important} is a directory" in err, err
    untouched(important)


def test_python_api_refuses_too(important, tiny_bert_dir, tmp_path):
    import tcc
    with pytest.raises(UserError, match="non-empty directory tcc did not write") as e:
        tcc.compile(str(tiny_bert_dir), out=important, seq_len=8)
    assert "force=True" in e.value.hint
    with pytest.raises(UserError, match="did not write"):
        tcc.compile(str(tiny_bert_dir), out=tmp_path / "out", seq_len=8, report=important / "notes.txt")
    untouched(important)
    assert not (tmp_path / "out").exists()


def test_staging_checks_again_before_replacing(tmp_path):
    """What appears at the path while a compile runs is not deleted either: commit() checks again."""
    from tcc.artifact import Staging
    out = tmp_path / "out"
    with pytest.raises(UserError, match="did not write"):
        with Staging(out) as stage:
            (stage.dir / "model.so").write_bytes(b"new")
            out.mkdir()
            (out / "notes.txt").write_text(PRECIOUS)
            stage.commit()
    untouched(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the staging directory is gone


# -- tcc's own earlier output is replaced; --force replaces anything ---------------------------------------

@pytest.fixture(scope="module")
def compiled(tmp_path_factory, tiny_bert_dir):
    """`tcc compile -o art --report report.json` twice (the second replaces the first's output, no
    --force), then `-o important --report mine.json --force`. Returns the folder, the inodes of the
    first compile's outputs, and the exit codes."""
    d = tmp_path_factory.mktemp("own")
    args = ["compile", str(tiny_bert_dir), *FAST, "-o", str(d / "art"), "--report", str(d / "report.json")]
    codes = [main(args)]
    first = {p: os.stat(d / p).st_ino for p in ("art", "art/manifest.json", "report.json")}
    codes.append(main(args))
    (d / "important").mkdir()
    (d / "important" / "notes.txt").write_text(PRECIOUS)
    (d / "mine.json").write_text(PRECIOUS)
    codes.append(main(["compile", str(tiny_bert_dir), *FAST, "-o", str(d / "important"), "--report",
                       str(d / "mine.json"), "--force"]))
    return d, first, codes


def test_compile_replaces_its_own_artifact_and_report(compiled):
    d, first, codes = compiled
    assert codes[:2] == [0, 0]
    for p, inode in first.items():
        assert os.stat(d / p).st_ino != inode, f"{p} was not replaced"
    assert json.loads((d / "art" / "manifest.json").read_text())["format"].startswith("tcc-artifact/")
    assert json.loads((d / "report.json").read_text())["final"]["exit_status"] == 0


def test_compile_force_replaces_a_folder_and_a_file(compiled):
    d, _, codes = compiled
    assert codes[2] == 0
    assert not (d / "important" / "notes.txt").exists()
    assert json.loads((d / "important" / "manifest.json").read_text())["format"].startswith("tcc-artifact/")
    assert json.loads((d / "mine.json").read_text())["schema"].startswith("tcc.report/")
    assert not [n for n in os.listdir(d) if n.startswith(".")]  # no staging or old sibling left


def test_run_replaces_its_own_npz_and_force_replaces_a_users(compiled, tiny_bert_dir, tmp_path, capsys):
    import torch
    from transformers import BertModel
    d, _, _ = compiled
    ids = np.random.default_rng(0).integers(1, 100, size=(1, 8)).astype(np.int64)
    mask = np.ones_like(ids)
    np.savez(tmp_path / "in.npz", input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        want = BertModel.from_pretrained(tiny_bert_dir).eval()(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    out, theirs = tmp_path / "out.npz", tmp_path / "theirs.npz"
    np.savez(theirs, x=np.arange(3))
    for target, extra in ((out, []), (out, []), (theirs, ["--force"])):  # new, tcc's own again, a user's with --force
        inode = os.stat(target).st_ino if target.exists() else None
        code, err = cli(capsys, "run", d / "art", "--inputs", tmp_path / "in.npz", "-o", target, *extra)
        assert code == 0, err
        assert os.stat(target).st_ino != inode
        with np.load(target) as z:
            assert z.files == ["last_hidden_state"]
            assert np.max(np.abs(z["last_hidden_state"] - want)) <= 1e-4
    assert sorted(os.listdir(tmp_path)) == ["in.npz", "out.npz", "theirs.npz"]


@pytest.fixture(scope="module")
def tiny_bert_with_tokenizer(tiny_bert_dir, tmp_path_factory) -> Path:
    """The tiny BERT with a 78-token WordPiece tokenizer (letters, digits, punctuation), so
    `tcc analyze -o` can calibrate on text."""
    from transformers import BertTokenizerFast
    d = tmp_path_factory.mktemp("models") / "tiny-bert-tok"
    shutil.copytree(tiny_bert_dir, d)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *("##" + c for c in string.ascii_lowercase), *string.digits, *".,;:!?()-'\""]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(d / "vocab.txt")).save_pretrained(str(d))
    return d


def test_analyze_replaces_its_own_analysis_and_writes_with_force(tiny_bert_with_tokenizer, tmp_path, important, capsys):
    args = ["analyze", tiny_bert_with_tokenizer, "--seq-len", 8, "--calibration-samples", 2, "-o"]
    out = tmp_path / "analysis"
    written = []
    for target, extra in ((out, []), (out, []), (important, ["--force"])):
        code, err = cli(capsys, *args, target, *extra)
        assert code == 0, err
        report = json.loads((target / "redundancy.json").read_text())
        assert len(report["blocks"]) == 2 and (target / "redundancy.png").read_bytes()[:4] == b"\x89PNG"
        written.append(os.stat(target / "redundancy.json").st_mtime_ns)
    assert written[0] != written[1]  # the second run rewrote the first's files
    assert (important / "notes.txt").read_text() == PRECIOUS  # --force writes there; it deletes nothing it need not


@pytest.fixture(scope="module")
def tiny_program(tiny_bert_dir):
    import tcc
    return tcc.trace(str(tiny_bert_dir), seq_len=8)


NARROW = dict(quantization=("int8",), structure=(), measure=0, eval_samples=2, calibration_samples=2)


def test_search_resumes_in_its_own_directory_and_force_writes_into_a_users(tiny_program, tmp_path, important):
    from tcc.search import MARKER, search
    work = tmp_path / "search"
    first = search(tiny_program, "x86", max_drop=0.5, work_dir=work, **NARROW)
    assert json.loads((work / MARKER).read_text())["format"].startswith("tcc-search/")
    trials = (work / "trials.jsonl").read_text()
    again = search(tiny_program, "x86", max_drop=0.5, work_dir=work, **NARROW)  # tcc's own: resumed
    (work / MARKER).unlink()  # a search directory from before the marker: its trials.jsonl says it is tcc's
    legacy = search(tiny_program, "x86", max_drop=0.5, work_dir=work, **NARROW)
    assert (work / "trials.jsonl").read_text() == trials  # every trial came from the log
    assert first.chosen["pipeline"] == again.chosen["pipeline"] == legacy.chosen["pipeline"]
    with pytest.raises(UserError, match="search directory .*did not write"):
        search(tiny_program, "x86", max_drop=0.5, work_dir=important, **NARROW)
    untouched(important)
    forced = search(tiny_program, "x86", max_drop=0.5, work_dir=important, force=True, **NARROW)
    assert forced.chosen["pipeline"] == first.chosen["pipeline"]
    assert (important / "notes.txt").read_text() == PRECIOUS and (important / "trials.jsonl").exists()
