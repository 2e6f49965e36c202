"""OpenAI wire types for what shapes an answer: response formats, vLLM's structured_outputs, tools,
tool choices and the tool calls in a conversation (protocol.py holds the requests that use them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


# NOTE: OpenAI's rule for function names: letters, digits, underscores and dashes, at most 64. The
# calls relayed in a conversation follow it too: a template writes their names into the prompt.
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionCall(OpenAIModel):
    name: FunctionName
    arguments: str  # JSON text, as OpenAI gives it


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class JsonSchemaFormat(OpenAIModel):
    name: Annotated[str, Field(max_length=64)] = "response"
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a json_schema response format needs its json_schema object")
        return self


class StructuredOutputs(OpenAIModel):
    """vLLM's structured_outputs extension: exactly one constraint on the output."""

    model_config = ConfigDict(extra="forbid", strict=True)  # NOTE: an option we do not know is refused
    json_: Union[dict[str, Any], str, None] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[Annotated[list[str], Field(min_length=1)]] = None
    grammar: Optional[str] = None  # Lark (llguidance's dialect) or GBNF (llama.cpp's)
    json_object: Optional[bool] = None


class FunctionDef(OpenAIModel):
    name: FunctionName
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction
