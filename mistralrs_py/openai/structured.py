"""What a request asks of its output's form: a grammar (response_format, structured_outputs, a tool
choice) and how its text is read back (tool calls). Written once for chat and completions, for every
front end.

    plan = plan_output(req, tokenizer, tool_parser=None)   # InvalidRequest for what cannot be honoured
    plan.grammar        # a GrammarSpec for the engine, or None
    plan.tools          # the tool definitions for the chat template, or None
    plan.parser()       # a ToolCallParser per choice, or None
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from llguidance import regex_to_lark

from ..engine.grammar import Choice, GrammarSpec, JsonSchema, Lark, Regex, json_rule
from ..pipeline.chat_template import template_variables
from . import protocol as P
from .json_schemas import close_objects
from .tool_calls import ToolCallParser
from .tool_formats import FORMATS, ToolFormat, call_grammar, call_rules, detect_format

ANY_JSON_OBJECT = {"type": "object"}
TOOL_PARSERS = tuple(FORMATS)


@dataclass
class OutputPlan:
    grammar: Optional[GrammarSpec] = None
    param: Optional[str] = None  # the request field the grammar came from (for error messages)
    tools: Optional[list[dict]] = None  # OpenAI tool definitions, for the chat template
    tool_format: Optional[ToolFormat] = None  # set when tool calls are read back from the text
    tool_names: set[str] = field(default_factory=set)
    forced: bool = False  # tool_choice required or named: the grammar guarantees well-formed calls
    parallel: bool = True
    keep_special_tokens: bool = False  # the format's marker is a special token: decode it

    def parser(self) -> Optional[ToolCallParser]:
        if self.tool_format is None:
            return None
        return ToolCallParser(self.tool_format, self.tool_names, incremental=self.forced, parallel=self.parallel)


def plan_output(
    req: P.SamplingFields, tokenizer, tool_parser: Optional[str] = None, open_objects: bool = False
) -> OutputPlan:
    """`open_objects`: JSON Schema's own rule, where an object may carry properties its schema does
    not name; by default the objects a schema describes are closed to them (see close_objects)."""
    plan = OutputPlan()
    fmt_spec = _format_spec(req)
    if fmt_spec is not None:
        plan.grammar, plan.param = fmt_spec
    if isinstance(req, P.ChatCompletionRequest) and req.tools:
        _plan_tools(req, tokenizer, tool_parser, plan, open_objects)
    if isinstance(plan.grammar, JsonSchema) and not open_objects:
        plan.grammar = JsonSchema(close_objects(plan.grammar.schema))
    return plan


# ---- response formats -------------------------------------------------------------------------------
def _format_spec(req: P.SamplingFields) -> Optional[tuple[GrammarSpec, str]]:
    """The one output constraint a request gives, under any of its names; two are a 400."""
    found: list[tuple[GrammarSpec, str]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append((JsonSchema(ANY_JSON_OBJECT), "response_format"))
    elif rf is not None and rf.type == "json_schema":
        schema = rf.json_schema.schema_
        # NOTE: OpenAI takes a missing schema as any JSON (json_object's rule)
        found.append((JsonSchema(schema if schema is not None else ANY_JSON_OBJECT), "response_format"))
    so = req.structured_outputs
    if so is not None:
        given = [
            (k, v)
            for k, v in (
                ("json", so.json_),
                ("regex", so.regex),
                ("choice", so.choice),
                ("grammar", so.grammar),
                ("json_object", so.json_object or None),
            )
            if v is not None
        ]
        if len(given) != 1:
            raise P.InvalidRequest(
                "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                "structured_outputs",
            )
        kind, value = given[0]
        found.append((_spec(kind, value, f"structured_outputs.{kind}"), f"structured_outputs.{kind}"))
    for kind, name in (
        ("json", "guided_json"),
        ("regex", "guided_regex"),
        ("choice", "guided_choice"),
        ("grammar", "guided_grammar"),
        ("gbnf", "grammar"),
        ("json", "json_schema"),
    ):
        value = getattr(req, name)
        if value is not None:
            found.append((_spec(kind, value, name), name))
    if len(found) > 1:
        raise P.InvalidRequest(
            f"give one output constraint, not several ({', '.join(p for _, p in found)})", found[1][1]
        )
    return found[0] if found else None


def _spec(kind: str, value, param: str) -> GrammarSpec:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise P.InvalidRequest(f"{param}: not valid JSON", param) from None
        if not isinstance(value, dict):
            raise P.InvalidRequest(f"{param}: a JSON schema is an object", param)
        return JsonSchema(value)
    if kind == "json_object":
        return JsonSchema(ANY_JSON_OBJECT)
    if kind == "regex":
        return Regex(value)
    if kind == "choice":
        return Choice(tuple(value))
    if kind == "gbnf" or (kind == "grammar" and "::=" in value):
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            return Lark(gbnf_to_lark(value))
        except Exception as e:  # noqa: BLE001 - the converter raises plain exceptions for bad input
            raise P.InvalidRequest(f"{param}: not a GBNF grammar llguidance can read ({e})", param) from None
    return Lark(value)


# ---- tools -------------------------------------------------------------------------------------------
def _plan_tools(
    req: P.ChatCompletionRequest, tokenizer, tool_parser: Optional[str], plan: OutputPlan, open_objects: bool
) -> None:
    choice = req.tool_choice or "auto"
    template = tokenizer.chat_template or ""
    shows_tools = "tools" in template_variables(template)
    if choice == "none" and not shows_tools:
        return  # NOTE: no call may be made: a template that cannot show the tools simply does not
    if not shows_tools:
        raise P.InvalidRequest(
            "this model's chat template cannot show the model tool definitions (it never reads `tools`): "
            "start the server with --chat-template hermes-tools (bundled: ChatML with tool calls, for "
            "Qwen, Hermes and SmolLM models) or another template that reads `tools`, or leave tools out",
            "tools",
        )
    plan.tools = [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in req.tools]
    if choice == "none":
        return  # NOTE: the model sees the tools but its answer is text: nothing is parsed
    fmt = FORMATS[tool_parser] if tool_parser else detect_format(template)
    if fmt is None:
        raise P.InvalidRequest(
            "the chat template's tool-call format is not one this server recognises (hermes, llama3_json, "
            "mistral): start the server with --tool-call-parser NAME",
            "tools",
        )
    chosen = [t for t in req.tools if isinstance(choice, str) or t.function.name == choice.function.name]
    plan.tool_format = fmt
    plan.tool_names = {t.function.name for t in chosen}
    plan.parallel = req.parallel_tool_calls is not False and not isinstance(choice, P.NamedToolChoice)
    specials = _special_tokens(tokenizer)
    plan.keep_special_tokens = fmt.trigger in specials
    tools = [{"name": t.function.name, "parameters": t.function.parameters} for t in chosen]
    if not open_objects:
        tools = [{**t, "parameters": close_objects(t["parameters"])} for t in tools]
    if choice == "auto":
        if plan.grammar is not None:
            # NOTE: the answer takes the requested form, or it is a call: both stay possible
            answer = _answer_rule(plan.grammar, plan.param)
            rules = call_rules(fmt, tools, plan.parallel, specials)
            plan.grammar = Lark(f"start: answer | calls\nanswer: {answer}\n{rules}")
        return
    # NOTE: a forced turn is a call; a response format given beside it is for the turns the model
    # answers in text (OpenAI accepts the pair; openai-agents sends it to force a tool with an
    # output type), so it does not constrain this one
    plan.forced = True
    plan.grammar, plan.param = Lark(call_grammar(fmt, tools, plan.parallel, specials)), "tools"


def _answer_rule(spec: GrammarSpec, param: Optional[str]) -> str:
    """The body of a Lark rule matching what `spec` matches (to put beside tool calls)."""
    if isinstance(spec, JsonSchema):
        return json_rule(spec.schema)
    if isinstance(spec, Choice):
        return " | ".join(json.dumps(o) for o in spec.options)
    if isinstance(spec, Regex):
        return f"/{regex_to_lark(spec.pattern, '')}/"
    raise P.InvalidRequest(
        f"{param}: a grammar cannot be combined with tools under tool_choice auto; "
        "use a JSON schema, a regex or a choice list, or tool_choice none",
        param,
    )


def _special_tokens(tokenizer) -> dict[str, int]:
    """The tokenizer's special tokens, text -> id."""
    backend = tokenizer.backend
    try:
        return {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    except AttributeError:
        return {}
