"""Function calling where the reply can be constrained: `tools` with `tool_choice` "required" or a named function.

ChatGLM2 has no tool-call format of its own, so nothing in its reply says "call a tool now"; but a reply can be
constrained to be one. With tool_choice "required" (any of the tools) or a named function, the reply's grammar
(engine/structured.py) is a JSON object `{"name": <one of the names>, "arguments": <that function's parameters>}`;
the ingress turns the finished JSON into OpenAI's `tool_calls` with finish_reason "tool_calls". "auto" would need the
model to decide, which it cannot do reliably, so it is a 400 that says so, and so is a conversation that carries tool
results (role "tool"), which ChatGLM2's prompt has no place for. "none" is the plain reply OpenAI defines for it.
"""

from __future__ import annotations

import json
import uuid

from serve_app.api.error_table import APIError
from serve_app.api.schemas import ChatCompletionRequest, FunctionCall, NamedToolChoice, ToolCall
from serve_app.engine.structured import canonical_schema

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
AUTO_REFUSED = ("tool_choice \"auto\" is not supported: ChatGLM2 has no tool-call format of its own to decide "
                "whether to call a tool; send tool_choice \"required\" or {\"type\": \"function\", \"function\": "
                "{\"name\": ...}} and the reply is constrained to a call")


def call_schema(body: ChatCompletionRequest) -> str | None:
    """The JSON Schema a tool-calling reply is constrained to; None when the request calls no tool. Raises the 400s
    of the module docstring."""
    choice, tools = body.tool_choice, body.tools
    if not tools:
        if choice not in (None, "none"):
            raise APIError("invalid_request", "tool_choice needs tools", param="tool_choice")
        return None
    if choice == "none":
        return None
    if choice in (None, "auto"):
        raise APIError("invalid_request", AUTO_REFUSED, param="tool_choice")
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError("invalid_request", "a tool call's reply is its arguments: response_format cannot be set too",
                       param="response_format")
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise APIError("invalid_request", "tools have duplicate names", param="tools")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise APIError("invalid_request", f"tool_choice names {choice.function.name!r}, which is not in tools",
                           param="tool_choice")
        tools = [tool for tool in tools if tool.function.name == choice.function.name]
    calls = [{"type": "object", "properties": {"name": {"const": tool.function.name},
                                               "arguments": arguments_schema(tool.function.parameters)},
              "required": ["name", "arguments"], "additionalProperties": False} for tool in tools]
    return canonical_schema(calls[0] if len(calls) == 1 else {"anyOf": calls})


def arguments_schema(parameters: dict | None) -> dict:
    """A function's parameters as its arguments' schema: an object schema that does not say whether it takes other
    properties takes none (a function has the parameters it declares; OpenAI's strict mode asks the same)."""
    if not parameters:
        return NO_ARGUMENTS
    if parameters.get("type") == "object" and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def tool_call(text: str) -> ToolCall | None:
    """The OpenAI tool call a finished constrained reply is; None when it is not one (a reply cut by max_tokens)."""
    try:
        call = json.loads(text)
        name, arguments = call["name"], call["arguments"]
    except (ValueError, KeyError, TypeError):
        return None
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", type="function",
                    function=FunctionCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False)))
