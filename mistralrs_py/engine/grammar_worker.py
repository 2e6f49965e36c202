"""`python -m mistralrs_py.engine.grammar_worker BYTES`: the grammar checker. Compiles the grammars
sent on stdin (after a first frame describing the tokenizer) and computes their first mask, with its
address space capped at BYTES; answers {"ok": true} or {"ok": false, "error": ...} on stdout.

Started by grammar.GrammarCompiler: a grammar that overflows the compiler's stack or takes all its
memory ends this process (and is refused), not the server."""

from __future__ import annotations

import sys


def main() -> None:
    from mistralrs_py.engine.grammar import (
        GrammarError,
        build_matcher,
        on_big_stack,
        spec_from_json,
        tokenizer_from,
    )
    from mistralrs_py.worker_pool import cap_memory, read_frame, serve

    try:
        desc = read_frame(sys.stdin.buffer)
    except EOFError:
        return
    llt = tokenizer_from(desc)
    cap_memory(sys.argv[1])

    def check(job) -> dict:
        try:
            on_big_stack(build_matcher, llt, spec_from_json(job))
            return {"ok": True}
        except GrammarError as e:
            return {"ok": False, "error": str(e)}
        except MemoryError:
            return {"ok": False, "error": "the grammar needs more memory than compiling one may use"}

    serve(check)


if __name__ == "__main__":
    main()
