"""OpenAI's Responses API over the chat path: the chat assembler's chunks become Responses' typed
stream events, and its output a Response object (request types and their conversion:
responses_protocol.py).

    asm = ResponsesAssembler(chat_assembler, req, model_name)
    asm.head()        # response.created, response.in_progress
    asm.feed(ev)      # output items as they are written: output_item.added, output_text.delta, ...
    asm.tail()        # response.completed (or response.incomplete), carrying the whole response
    asm.response()    # the Response object (not streaming)

Streamed or not, the output is built from the same events, so the two always agree.
"""

from __future__ import annotations

import copy
import time
import uuid
from typing import Optional

from ..engine.request import Event
from .responses import ChatAssembler
from .responses_protocol import ResponsesRequest, ToolChoiceObject


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponsesAssembler:
    def __init__(self, chat: ChatAssembler, req: ResponsesRequest, model: str):
        self.chat, self.req, self.model = chat, req, model
        self.rid = item_id("resp")
        self.created = int(time.time())
        self.completed_at: Optional[int] = None
        self.items: list[dict] = []  # the output items, as far as they are written
        self.open: Optional[dict] = None  # the item being written
        self.calls: dict[int, dict] = {}  # the chat's tool-call index -> its function_call item
        self.seq = 0
        self.finish_reason: Optional[str] = None

    # ---- the assembler interface (see responses.Assembler) ---------------------------------------
    def head(self) -> list[dict]:
        snapshot = self.build("in_progress", usage=None)
        return [
            self.event("response.created", response=snapshot),
            self.event("response.in_progress", response=copy.deepcopy(snapshot)),
        ]

    def feed(self, ev: Event) -> list[dict]:
        out: list[dict] = []
        for choice in (c for chunk in self.chat.feed(ev) for c in chunk["choices"]):
            delta = choice["delta"]
            if delta.get("content"):
                out += self.text(delta["content"])
            for tc in delta.get("tool_calls") or ():
                if "id" in tc:
                    out += self.call_start(tc["index"], tc["id"], tc["function"]["name"])
                if tc.get("function", {}).get("arguments"):
                    out += self.arguments(tc["index"], tc["function"]["arguments"])
            if choice["finish_reason"] is not None:
                out += self.finish(choice["finish_reason"])
        return out

    def tail(self) -> list[dict]:
        resp = self.response()
        kind = "response.incomplete" if resp["status"] == "incomplete" else "response.completed"
        return [self.event(kind, response=resp)]

    def response(self) -> dict:
        return self.build(self.status(), usage=self.usage())

    def texts(self) -> list[dict]:
        return self.chat.texts()

    def error(self, message: str, code: Optional[str]) -> dict:
        """The stream's last event when generation fails."""
        return self.event("error", code=code, message=message, param=None)

    # ---- output items ------------------------------------------------------------------------------
    def event(self, kind: str, **fields) -> dict:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def add(self, item: dict) -> list[dict]:
        out = self.close()
        self.items.append(item)
        self.open = item
        return out + [
            self.event("response.output_item.added", output_index=len(self.items) - 1, item=copy.deepcopy(item))
        ]

    def open_message(self) -> list[dict]:
        msg = {"id": item_id("msg"), "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        out = self.add(msg)
        msg["content"].append(text_part(""))
        return out + [self.event("response.content_part.added", **self.where(), content_index=0, part=text_part(""))]

    def text(self, piece: str) -> list[dict]:
        out: list[dict] = []
        if self.open is None or self.open["type"] != "message":
            out += self.open_message()
        self.open["content"][0]["text"] += piece
        return out + [
            self.event("response.output_text.delta", **self.where(), content_index=0, delta=piece, logprobs=[])
        ]

    def call_start(self, index: int, call_id: str, name: str) -> list[dict]:
        item = {
            "id": item_id("fc"),
            "type": "function_call",
            "status": "in_progress",
            "call_id": call_id,
            "name": name,
            "arguments": "",
        }
        self.calls[index] = item
        return self.add(item)

    def arguments(self, index: int, piece: str) -> list[dict]:
        item = self.calls[index]
        item["arguments"] += piece
        at = self.items.index(item)
        return [self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=at, delta=piece)]

    def where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.items) - 1}

    def close(self) -> list[dict]:
        """Ends the item being written: its done events."""
        item, out = self.open, []
        if item is None:
            return out
        at = self.where()
        if item["type"] == "message":
            part = item["content"][0]
            out.append(self.event("response.output_text.done", **at, content_index=0, text=part["text"], logprobs=[]))
            out.append(self.event("response.content_part.done", **at, content_index=0, part=copy.deepcopy(part)))
            item["status"] = "incomplete" if self.finish_reason == "length" else "completed"
        else:
            # NOTE: a call cut short by max_output_tokens stays in the output, marked incomplete
            if item["call_id"] in self.finished_calls():
                item["status"] = "completed"
                out.append(self.event("response.function_call_arguments.done", **at, arguments=item["arguments"]))
            else:
                item["status"] = "incomplete"
        self.open = None
        return out + [
            self.event("response.output_item.done", output_index=at["output_index"], item=copy.deepcopy(item))
        ]

    def finished_calls(self) -> set[str]:
        parser = (self.chat.parsers or [None])[0]
        return {c["id"] for c in parser.calls} if parser is not None else set()

    def finish(self, reason: str) -> list[dict]:
        self.finish_reason = reason
        self.completed_at = int(time.time())
        out: list[dict] = []
        if not self.items:
            out += self.open_message()  # NOTE: an empty answer is still a message, so clients find its text
        return out + self.close()

    # ---- the Response object -----------------------------------------------------------------------
    def status(self) -> str:
        if self.finish_reason is None:
            return "in_progress"
        return "incomplete" if self.finish_reason == "length" else "completed"

    def usage(self) -> dict:
        u = self.chat.usage()
        return {
            "input_tokens": u["prompt_tokens"],
            "input_tokens_details": {
                "cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                "cache_write_tokens": 0,
            },
            "output_tokens": u["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["total_tokens"],
        }

    def build(self, status: str, usage: Optional[dict]) -> dict:
        r = self.req
        choice = r.tool_choice
        fmt = r.text.format if r.text and r.text.format else None
        return {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": False,
            "completed_at": self.completed_at if status != "in_progress" else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens,
            "max_tool_calls": None,
            "metadata": r.metadata or {},
            "model": self.model,
            "output": copy.deepcopy(self.items) if status != "in_progress" else [],
            "parallel_tool_calls": r.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": False,
            "temperature": 1.0 if r.temperature is None else r.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": {"type": "function", "name": choice.name}
            if isinstance(choice, ToolChoiceObject)
            else (choice or "auto"),
            "tools": [
                {"type": "function", **t.model_dump(exclude_none=True, exclude={"type"}), "strict": t.strict}
                for t in r.tools or ()
            ],
            "top_p": 1.0 if r.top_p is None else r.top_p,
            "truncation": r.truncation or "disabled",
            "usage": usage,
            "user": r.user,
        }
