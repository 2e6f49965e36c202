"""Tool-call formats: how each model family writes a call, which one a chat template speaks, and the
grammar that makes a required or named call well formed (tool_calls.py reads calls back).

    fmt = detect_format(template)                        # HERMES, LLAMA3_JSON, MISTRAL or None
    rules = call_rules(fmt, tools, parallel=True)         # Lark rules for llguidance, defining `calls`
    grammar = "start: calls\n" + rules                    # tool_choice required or named

The formats (vLLM's parser names, for --tool-call-parser):
- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call (Hermes, Qwen 2.5/3)
- llama3_json: `{"name": ..., "parameters": {...}}`, calls separated by `;`, optionally after
  `<|python_tag|>` (Llama 3.1-3.3); only recognised at the start of the answer
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral 7B v0.3, Nemo, Small)
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional

from ..engine.grammar import json_rule
from .json_schemas import scoped_refs


@dataclass(frozen=True)
class ToolFormat:
    name: str
    trigger: str  # text that starts the tool-call part of an answer ("" for llama3_json: a JSON object first)
    region_open: tuple[str, ...]  # literals before the first call (the trigger included, where it is one)
    call_open: str  # before each call
    call_close: str  # after each call
    separator: str  # between calls
    region_close: str  # after the last call
    args_key: str  # what the format calls the arguments (both names are accepted when parsing)
    id_length: int = 24  # characters of a call id after its prefix; Mistral's templates require 9, alphanumeric


HERMES = ToolFormat("hermes", "<tool_call>", (), "<tool_call>", "</tool_call>", "", "", "arguments")
LLAMA3_JSON = ToolFormat("llama3_json", "", (), "", "", ";", "", "parameters")
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", ("[TOOL_CALLS]", "["), "", "", ",", "]", "arguments", id_length=9)
FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL)}
PYTHON_TAG = "<|python_tag|>"


def detect_format(template: str) -> Optional[ToolFormat]:
    """The tool-call format a chat template teaches its model, from the markers it writes."""
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<tool_call>" in template:
        return HERMES
    # NOTE: Llama 3.1's template asks for {"name": function name, "parameters": dictionary of argument name and its value}
    if '"parameters"' in template or PYTHON_TAG in template:
        return LLAMA3_JSON
    return None


def new_call_id(fmt: ToolFormat) -> str:
    alphabet = string.ascii_letters + string.digits
    body = "".join(secrets.choice(alphabet) for _ in range(fmt.id_length))
    return body if fmt is MISTRAL else f"call_{body}"


# ---- the grammar of a forced call -----------------------------------------------------------------
def _refers(schema) -> bool:
    """Whether a schema holds a local reference ("$ref": "#...") anywhere."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        return (isinstance(ref, str) and ref.startswith("#")) or any(_refers(v) for v in schema.values())
    if isinstance(schema, list):
        return any(_refers(v) for v in schema)
    return False


def parameters_schema(parameters: Optional[dict]) -> dict:
    """OpenAI: a function without `parameters` takes none; `{}` means any object."""
    if parameters is None:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return parameters or {"type": "object"}


def call_grammar(
    fmt: ToolFormat, tools: list[dict], parallel: bool, special: Mapping[str, int] = MappingProxyType({})
) -> str:
    """A Lark grammar (llguidance's, with %json) whose every sentence is one call, or one or more calls
    when `parallel`, to one of `tools` ([{"name", "parameters"}]) with arguments valid against that
    function's schema. `special`: the tokenizer's special tokens (text -> id); a marker that is one is
    matched as that token."""
    return "start: calls\n" + call_rules(fmt, tools, parallel, special)


def call_rules(
    fmt: ToolFormat, tools: list[dict], parallel: bool, special: Mapping[str, int] = MappingProxyType({})
) -> str:
    """The rules behind call_grammar, without `start`: the rule `calls` (and `call`)."""
    options, defs = [], {}
    for i, t in enumerate(tools):
        params = parameters_schema(t.get("parameters"))
        if _refers(params):
            # NOTE: the arguments' schema sits inside the call's: its own references ("#/$defs/Address",
            # as every nested pydantic model writes them) would resolve against the call's root. Each
            # such tool's schema moves to the root's $defs, its references rewritten to point there,
            # so tools whose $defs share names never meet.
            key = f"tool_{i}"
            defs[key] = scoped_refs(params, f"#/$defs/{key}")
            params = {"$ref": f"#/$defs/{key}"}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": t["name"]}, fmt.args_key: params},
                "required": ["name", fmt.args_key],
                "additionalProperties": False,
            }
        )
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    if defs:
        schema = {"$defs": defs, **schema}

    def lit(text: str) -> str:
        # NOTE: a marker that is a special token is matched as that token (its text alone would
        # tokenize differently, and the model has only seen the token): llguidance writes
        # <|name|> tokens as they are and any other one by id
        if text not in special:
            return json.dumps(text)
        return text if text.startswith("<|") and text.endswith("|>") else f"<[{special[text]}]>"

    if fmt is HERMES:
        block = f'{lit("<tool_call>")} "\\n" call "\\n" {lit("</tool_call>")}'
        body = f'{block} ("\\n" {block})*' if parallel else block
        return f"calls: {body}\ncall: {json_rule(schema)}\n"
    if fmt is MISTRAL:
        trigger = lit(fmt.trigger)
        body = 'call (", " call)*' if parallel else "call"
        return f'calls: {trigger} "[" {body} "]"\ncall: {json_rule(schema)}\n'
    body = 'call ("; " call)*' if parallel else "call"
    return f"calls: {body}\ncall: {json_rule(schema)}\n"
