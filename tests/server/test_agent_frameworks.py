"""Agent frameworks, each used unchanged through its public API, against a real server on the embedded
model with its default (tools-capable) chat template: pydantic-ai, instructor, LlamaIndex, the openai-agents
SDK and LangChain. Each asks for a nested pydantic model (a `$defs`/`$ref` schema) or forces a tool call;
what is checked is that the framework gets a parsed, schema-valid result, not that a 135M model answers
sensibly. instructor (it needs jiter<0.15, so an older openai) and LlamaIndex's OpenAILike (openai<3,
while openai-agents needs openai>=3) cannot share the test environment: `make frameworks` installs them
in one of their own (.venv-frameworks, layered over .venv with the older openai), and their tests run
there, against the server this module started."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

# NOTE: every request below is a constrained, short generation; the timeouts are for a busy 2-core machine
TIMEOUT = 300
MAX_TOKENS = 300


class Address(BaseModel):
    city: str = Field(max_length=20)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]
    address: Address


ASK = "Make up a person who lives in Paris."


FRAMEWORKS_PYTHON = Path(__file__).parents[2] / ".venv-frameworks" / "bin" / "python"
SERVER_ENV = "MISTRALRS_TEST_SERVER_URL"


@pytest.fixture(scope="module")
def url(request):
    # NOTE: a test re-run in the frameworks' environment is given this module's server
    return os.environ.get(SERVER_ENV) or request.getfixturevalue("embedded_gguf_server")


def in_frameworks_env(url: str, module: str, test: str) -> bool:
    """False when `module` imports here; otherwise runs `test` in the frameworks' environment (which
    `make frameworks` builds) against `url`, and fails with its output if it fails there."""
    if importlib.util.find_spec(module.split(".")[0]) is not None and _imports(module):
        return False
    if not FRAMEWORKS_PYTHON.exists():
        pytest.skip(f"{module} is not installed here, and .venv-frameworks does not exist (`make frameworks`)")
    done = subprocess.run(
        [str(FRAMEWORKS_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{test}"],
        env={**os.environ, SERVER_ENV: url},
        capture_output=True,
        text=True,
        timeout=2 * TIMEOUT,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]
    return True


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def test_pydantic_ai_default_output_is_a_forced_tool_with_defs(url):
    pytest.importorskip(
        "pydantic_ai.models.openai", reason="pydantic-ai-slim[openai] is not installed", exc_type=ImportError
    )
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.settings import ModelSettings

    model = OpenAIChatModel("default", provider=OpenAIProvider(base_url=f"{url}/v1", api_key="unused"))
    settings = ModelSettings(temperature=0, max_tokens=MAX_TOKENS, timeout=TIMEOUT)
    # NOTE: the default output mode: the output type becomes a tool ("final_result") the model must call
    result = Agent(model, output_type=Person, model_settings=settings).run_sync(ASK)
    assert isinstance(result.output, Person)
    calls = [p for m in result.all_messages() for p in m.parts if p.part_kind == "tool-call"]
    assert calls and calls[-1].tool_name == "final_result"


def test_instructor_tools_mode_with_a_nested_model(url):
    if in_frameworks_env(url, "instructor", "test_instructor_tools_mode_with_a_nested_model"):
        return
    import instructor
    from openai import OpenAI

    raw = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    c = instructor.from_openai(raw, mode=instructor.Mode.TOOLS)
    person, completion = c.chat.completions.create_with_completion(
        model="default",
        response_model=Person,
        messages=[{"role": "user", "content": ASK}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=1,
    )
    assert isinstance(person, Person)
    call = completion.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), Person.model_json_schema())


def test_llama_index_structured_predict_with_a_nested_model(url):
    if in_frameworks_env(
        url, "llama_index.llms.openai_like", "test_llama_index_structured_predict_with_a_nested_model"
    ):
        return
    from llama_index.core.prompts import PromptTemplate
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(
        model="default",
        api_base=f"{url}/v1",
        api_key="unused",
        is_chat_model=True,
        # NOTE: structured_predict then goes through a forced tool call (FunctionCallingProgram)
        is_function_calling_model=True,
        context_window=2048,
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
        timeout=TIMEOUT,
    )
    got = llm.structured_predict(Person, PromptTemplate("Make up a person who lives in {city}."), city="Paris")
    assert isinstance(got, Person)


def test_openai_agents_required_tool_choice_with_an_output_type(url):
    pytest.importorskip("agents", reason="openai-agents is not installed")
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    looked_up: list[str] = []

    # NOTE: the tool may be used once: a 135M model, left free to choose after it, calls it again and again
    # (the server lets it: tool_choice is "auto" then), until max_turns
    @function_tool(is_enabled=lambda ctx, agent: not looked_up)
    def lookup_city(city: str) -> str:
        """Facts about a city."""
        looked_up.append(city)
        return f"{city} is in France; its zip codes start with 75."

    agent = Agent(
        name="maker",
        instructions="Look up the city with the tool, then make up a person who lives there.",
        model=OpenAIChatCompletionsModel(
            model="default",
            openai_client=AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT),
        ),
        tools=[lookup_city],
        output_type=Person,
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=MAX_TOKENS),
    )
    result = asyncio.run(Runner.run(agent, ASK, max_turns=4))
    # NOTE: the forced first turn is the tool call (tools, tool_choice required and response_format in one
    # request); after it the SDK drops tool_choice, the tool is off, and the model answers to the schema
    assert looked_up and all(isinstance(c, str) for c in looked_up)
    assert isinstance(result.final_output, Person)


def test_langchain_bind_tools_required_and_named_on_an_open_schema(url):
    pytest.importorskip("langchain_openai", reason="langchain-openai is not installed")
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{url}/v1",
        api_key="unused",
        model="default",
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
        timeout=TIMEOUT,
    )
    # NOTE: an open schema: no additionalProperties, as most hand-written and MCP tool schemas are
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather forecast for a city over some days.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 30},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
            },
        },
    }
    # NOTE: a pydantic model as a tool: its schema has $defs/$ref
    for choice, tools in (("required", [weather, Person]), ("any", [weather]), ("Person", [weather, Person])):
        msg = llm.bind_tools(tools, tool_choice=choice).invoke(ASK if "Person" in choice else "Weather in Paris?")
        assert len(msg.tool_calls) >= 1, choice
        for call in msg.tool_calls:
            if call["name"] == "get_weather":
                jsonschema.validate(call["args"], weather["function"]["parameters"])
            else:
                assert call["name"] == "Person", choice
                Person.model_validate(call["args"])
        if choice == "Person":
            assert [c["name"] for c in msg.tool_calls] == ["Person"]
