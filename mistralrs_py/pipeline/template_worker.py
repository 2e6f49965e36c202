"""`python -m mistralrs_py.pipeline.template_worker BYTES`: renders chat templates sent on stdin
(length-prefixed JSON frames) and answers on stdout, with its address space capped at BYTES.

Started by chat_template.TemplateSandbox; a render that runs out of memory fails with a MemoryError
here (answered as an error) or ends this process (the server then starts another)."""

from __future__ import annotations

import sys


def main() -> None:
    from mistralrs_py.pipeline.chat_template import ChatTemplateError, environment, render_template
    from mistralrs_py.worker_pool import cap_memory, serve

    environment()  # NOTE: jinja2 imported and the sandbox built before the cap
    cap_memory(sys.argv[1])

    def render(job) -> dict:
        try:
            text = render_template(job["template"], **job["context"])
            # NOTE: the reply is serialised here, inside the cap too
            return {"ok": True, "text": text}
        except ChatTemplateError as e:
            return {"ok": False, "error": str(e)}
        except MemoryError:
            return {"ok": False, "error": "chat template needs more memory than a render may use"}
        except Exception as e:  # noqa: BLE001 - whatever a template does, it is its request's error
            return {"ok": False, "error": f"chat template could not render these messages: {type(e).__name__}"}

    serve(render)


if __name__ == "__main__":
    main()
