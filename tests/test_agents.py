"""Agent frameworks run one tool round trip against anyad's local model: langchain-openai's
``bind_tools``, pydantic-ai's default (tool) output and openai-agents' chat-completions model,
each pointed at the daemon's /v1 and unchanged otherwise.

The model is the tiny random-weight GGUF with Qwen2.5's (hermes) template. Its text is noise,
so each call is forced by ``tool_choice``: anyad's grammar is what makes the call valid. Such a
model never ends its turn by itself, so ``parallel_tool_calls`` is off (as a user asking for one
call would set it); left on, the grammar lets it write call after call until ``max_tokens``.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Annotated

import openai
import pytest
from pydantic import BaseModel, Field

from conftest import settings_for

MODEL = "hermes"
ASK = "What is the weather in Oslo?"
# The schema's maxLength bounds the forced call; this leaves it room with the tiny vocabulary.
MAX = 200
# The answer after the tool result only has to arrive, not to mean anything.
ANSWER_MAX = 8


class City(BaseModel):
    """The weather in a city."""

    city: str = Field(max_length=8, description="The city's name")


@pytest.fixture(autouse=True)
def _no_calls_home(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every framework reads keys and tracing switches from the environment: dummies and off,
    so nothing leaves 127.0.0.1 and no real key is picked up by accident."""
    monkeypatch.setenv("OPENAI_API_KEY", "not-needed")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    for var in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
        monkeypatch.setenv(var, "false")
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm reads its price list from here


@pytest.fixture
async def base_url(make_client, tmp_path, family_models) -> str:
    """The /v1 base URL of a daemon serving the hermes-template tiny model."""
    c = await make_client(settings_for(tmp_path, {MODEL: family_models[MODEL]}))
    return str(c.make_url("/v1"))


async def test_langchain_bind_tools_round_trip(base_url):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    ran: list[str] = []

    @tool("weather", args_schema=City)
    def weather(city: str) -> str:
        """The weather in a city."""
        ran.append(city)
        return json.dumps({"city": city, "sky": "clear"})

    llm = ChatOpenAI(base_url=base_url, api_key="not-needed", model=MODEL, max_tokens=MAX, temperature=0,
                     max_retries=0)
    history = [HumanMessage(ASK)]
    ai = await llm.bind_tools([weather], tool_choice="weather", parallel_tool_calls=False).ainvoke(history)
    assert isinstance(ai, AIMessage) and not ai.invalid_tool_calls
    [call] = ai.tool_calls
    assert call["name"] == "weather" and call["id"]
    City.model_validate(call["args"])

    # Run through the tool itself, as an agent loop does: it checks the args against the schema too.
    result = await weather.ainvoke(call)
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    assert ran == [call["args"]["city"]]

    answer = await llm.bind_tools([weather]).ainvoke(history + [ai, result], max_tokens=ANSWER_MAX)
    assert isinstance(answer, AIMessage)
    assert isinstance(answer.content, str) and answer.content
    assert answer.response_metadata["finish_reason"] in ("stop", "length")


async def test_pydantic_ai_tool_output_validates_on_the_first_call(base_url):
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelResponse
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.settings import ModelSettings

    # An SDK client of our own: no retries to hide an error, closed on the test's own loop.
    async with openai.AsyncOpenAI(base_url=base_url, api_key="not-needed", max_retries=0) as sdk:
        model = OpenAIChatModel(MODEL, provider=OpenAIProvider(openai_client=sdk))
        agent = Agent(model, output_type=City,
                      model_settings=ModelSettings(max_tokens=MAX, temperature=0, parallel_tool_calls=False))
        result = await agent.run(ASK)
    assert isinstance(result.output, City) and len(result.output.city) <= 8
    # One request: the grammar made the first output-tool call valid, pydantic-ai never had to retry.
    assert result.usage.requests == 1
    [response] = [m for m in result.all_messages() if isinstance(m, ModelResponse)]
    assert response.finish_reason == "tool_call"


@pytest.fixture
async def agents_kit(base_url):
    """For openai-agents: tracing off, an openai client on the daemon, the weather tool (the
    cities it ran for in ``ran``) and the model settings that force one call of it."""
    from agents import ModelSettings, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    ran: list[str] = []

    @function_tool
    def weather(city: Annotated[str, Field(max_length=8)]) -> str:
        """The weather in a city."""
        ran.append(city)
        return json.dumps({"city": city, "sky": "clear"})

    settings = ModelSettings(tool_choice="weather", parallel_tool_calls=False, max_tokens=MAX, temperature=0)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="not-needed", max_retries=0) as sdk:
        yield SimpleNamespace(sdk=sdk, weather=weather, ran=ran, settings=settings)


async def test_openai_agents_function_tool_round_trip(agents_kit):
    from agents import Agent, OpenAIChatCompletionsModel, Runner

    kit = agents_kit
    agent = Agent(name="forecaster", instructions="Answer with the weather.", tools=[kit.weather],
                  model=OpenAIChatCompletionsModel(model=MODEL, openai_client=kit.sdk), model_settings=kit.settings)
    # The SDK drops the forced tool_choice once a tool has run (reset_tool_choice): the
    # second turn answers instead of calling again, so two turns end the run.
    assert agent.reset_tool_choice
    result = await Runner.run(agent, ASK, max_turns=2)
    # The SDK validates the arguments before it calls the function: that it ran means they held.
    [city] = kit.ran
    assert len(city) <= 8
    assert isinstance(result.final_output, str) and result.final_output
    assert len(result.raw_responses) == 2


async def test_openai_agents_default_responses_model_round_trip(agents_kit):
    """The SDK's default model speaks the Responses API (POST /v1/responses)."""
    from agents import Agent, OpenAIResponsesModel, Runner

    class Forecast(BaseModel):
        sky: Annotated[str, Field(max_length=8)]

    kit = agents_kit
    # A structured final output: its grammar ends the random model's last turn (the SDK
    # takes a reply cut off by max_output_tokens for a failure, as it should).
    agent = Agent(name="forecaster", instructions="Answer with the weather.", tools=[kit.weather],
                  output_type=Forecast, model=OpenAIResponsesModel(model=MODEL, openai_client=kit.sdk),
                  model_settings=kit.settings)
    result = await Runner.run(agent, ASK, max_turns=2)
    [city] = kit.ran
    assert len(city) <= 8
    assert isinstance(result.final_output, Forecast)
    assert len(result.raw_responses) == 2


async def test_litellm_tool_call_and_text_completion(base_url):
    """litellm's own client (what its SDK users and its proxy send): a forced tool call with
    chat completions, and ``text_completion`` on the completions door."""
    import litellm

    r = await litellm.acompletion(model=f"openai/{MODEL}", api_base=base_url, api_key="not-needed",
                                  messages=[{"role": "user", "content": ASK}], max_tokens=MAX, temperature=0,
                                  tools=[{"type": "function", "function": {
                                      "name": "weather", "description": City.__doc__,
                                      "parameters": City.model_json_schema()}}],
                                  tool_choice={"type": "function", "function": {"name": "weather"}},
                                  parallel_tool_calls=False)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "weather" and City.model_validate_json(call.function.arguments)
    assert r.choices[0].finish_reason == "tool_calls"
    t = await litellm.atext_completion(model=f"text-completion-openai/{MODEL}", api_base=base_url,
                                       api_key="not-needed", prompt=["def add(a, b):", "x ="], max_tokens=3,
                                       temperature=0)
    assert [c.index for c in t.choices] == [0, 1] and all(isinstance(c.text, str) for c in t.choices)
    assert t.usage.completion_tokens <= 6 and t.usage.prompt_tokens > 0
