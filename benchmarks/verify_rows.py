"""Do an artifact's decode, verify and prefill entries give the same logits for the same position?
(issue 19: greedy speculation is the target's own tokens only if they do.) After prefilling a
128-token wikitext-2 test.txt prompt, 7 of its tokens (from --offset) go in one at a time (decode), as one verify call, and
as the end of a fresh chunked prefill each; prints whether each verify row equals the decode step (else
their max |difference| / max |logit|), each row's difference against the prefill, and the three argmaxes.

    python benchmarks/verify_rows.py ARTIFACT [--prompt-index 1] [--offset 0]
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    import tcc
    from speculative import prompts
    from tcc.generation import prefill_prompt
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--prompt-index", type=int, default=1)
    ap.add_argument("--offset", type=int, default=0, help="the 7 tokens: the prompt's from here (0: they repeat its start)")
    a = ap.parse_args()
    with tcc.load(a.artifact) as art:
        prompt = prompts(art.tokenizer(), 6, 128)[a.prompt_index]
        s = art.session()
        p = len(prompt)
        prefill_prompt(s.prefill, prompt, s.chunk, s.max_context)
        toks = [int(t) for t in prompt[a.offset:a.offset + 7]]
        dec = [s.decode(t, p + i) for i, t in enumerate(toks)]
        s.rollback(p)
        rows = s.verify(toks, p)
        for i in range(7):
            r = art.session()
            ref = prefill_prompt(r.prefill, prompt + toks[:i + 1], r.chunk, r.max_context)
            rel = lambda x: float(np.abs(x - ref).max() / np.abs(ref).max())  # noqa: E731
            same = "bit-identical" if np.array_equal(rows[i], dec[i]) else \
                f"{float(np.abs(rows[i] - dec[i]).max() / np.abs(dec[i]).max()):.2e}"
            print(f"row {i}: verify vs decode {same}; decode vs prefill {rel(dec[i]):.2e}, verify vs prefill "
                  f"{rel(rows[i]):.2e}; argmax "
                  f"{int(np.argmax(dec[i]))} {int(np.argmax(rows[i]))} {int(np.argmax(ref))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
