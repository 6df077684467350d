"""Tool calling: parsers that find calls in a model's text, and the constraints that
force a call (``tool_choice`` "required" or a named function).

Parsers (``--tool-call-parser``), a registry keyed by name:

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>  (Hermes, Qwen 2.5/3),
                 one block per call, text before the first block is the reply's content
    llama3_json  {"name": ..., "parameters": {...}} (Llama 3.1+), the whole reply, several
                 calls separated by ";", optionally after <|python_tag|>

``tool_choice="auto"`` lets the model answer or call; the parser decides. For
"required" and a named function the output is constrained (structured outputs) to JSON
that is already the call(s), so the arguments always parse whatever the model's
native format: a named function's output is its arguments object; "required" gives an
array of {"name", "parameters"} (one item when parallel_tool_calls is false, at most
twice the number of tools and never over MAX_PARALLEL_CALLS otherwise; a repeated call
is given once, and a reply cut short by max_tokens keeps the calls it wrote whole).
The arguments are strict: an object schema that lists properties allows only those
keys (see structured_output.strict_schema).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass
class ParsedToolCall:
    name: str
    arguments: str
    """JSON text of the arguments object (OpenAI sends arguments as a string)."""
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"call_{uuid.uuid4().hex[:24]}"


def _arguments_text(value: Any) -> str:
    if isinstance(value, str):
        try:
            return json.dumps(json.loads(value), ensure_ascii=False)
        except ValueError:
            return value
    return json.dumps(value if value is not None else {}, ensure_ascii=False)


class ToolParser:
    """Finds tool calls in generated text; ``start_marker`` lets streaming hold back
    text that may be the beginning of a call."""

    name: ClassVar[str]
    start_marker: ClassVar[str]

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """(content, calls) of a finished reply; no calls: (text, [])."""
        raise NotImplementedError

    def call_started(self, text: str) -> int | None:
        """Index in ``text`` where a tool call begins, or None."""
        i = text.find(self.start_marker)
        return None if i < 0 else i

    def safe_prefix(self, text: str) -> int:
        """How much of ``text`` can be streamed as content now: all of it but a tail
        that could still become the start marker."""
        marker = self.start_marker
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-k:]):
                return len(text) - k
        return len(text)


class HermesToolParser(ToolParser):
    name = "hermes"
    start_marker = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        start = text.find(self.start_marker)
        if start < 0:
            return text, []
        calls = []
        for body in self._block.findall(text[start:]):
            try:
                obj = json.loads(body)
            except ValueError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                args = obj.get("arguments", obj.get("parameters", {}))
                calls.append(ParsedToolCall(obj["name"], _arguments_text(args)))
        if not calls:
            return text, []
        content = text[:start].strip()
        return (content or None), calls


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    start_marker = "<|python_tag|>"

    def call_started(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith(self.start_marker) or stripped.startswith("{"):
            return len(text) - len(stripped)
        return None

    def safe_prefix(self, text: str) -> int:
        # A reply is either calls (from its first character) or text: hold back only
        # while it is empty or blank.
        return 0 if not text.strip() else len(text)

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        body = text.strip()
        if body.startswith(self.start_marker):
            body = body[len(self.start_marker) :].strip()
        if not body.startswith("{"):
            return text, []
        decoder = json.JSONDecoder()
        calls, pos = [], 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except ValueError:
                return text, []
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return text, []
            calls.append(
                ParsedToolCall(
                    obj["name"], _arguments_text(obj.get("parameters", obj.get("arguments")))
                )
            )
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return (None, calls) if calls else (text, [])


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (HermesToolParser, Llama3JsonToolParser)
}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(
            f"unknown tool call parser {name!r}; available: {', '.join(sorted(TOOL_PARSERS))}"
        )
    return TOOL_PARSERS[name]()


# ---- forced calls -------------------------------------------------------------------


def function_schemas(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> parameters schema of each function tool; ValueError for malformed tools."""
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type", "function") != "function"
            or not isinstance(fn, dict)
        ):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, _ . or -")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        out[name] = params
    return out


def required_schema(schemas: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """JSON schema of 'one or more calls': [{"name": ..., "parameters": {...}}, ...]."""
    items = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "parameters": params},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for name, params in schemas.items()
    ]
    # Parallel calls are bounded: a small model asked for "one or more" tends to repeat
    # its call until max_tokens.
    most = min(MAX_PARALLEL_CALLS, 2 * len(schemas)) if parallel else 1
    return {"type": "array", "items": {"anyOf": items}, "minItems": 1, "maxItems": most}


MAX_PARALLEL_CALLS = 8
"""The most calls one constrained ("required") reply may make."""


def calls_from_required(text: str, complete: bool = True) -> list[ParsedToolCall]:
    """The calls in a constrained 'required' reply, each distinct call once. With
    ``complete=False`` (the reply was cut short) the calls written whole are kept."""
    items: list[Any]
    if complete:
        items = json.loads(text)
    else:
        items, decoder = [], json.JSONDecoder()
        pos = text.find("[") + 1
        while 0 < pos < len(text):
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except ValueError:
                break
            items.append(obj)
    calls, seen = [], set()
    for c in items:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            continue
        args = _arguments_text(c.get("parameters"))
        if (c["name"], args) not in seen:
            seen.add((c["name"], args))
            calls.append(ParsedToolCall(c["name"], args))
    return calls


def tools_system_prompt(tools: list[dict[str, Any]], parser: ToolParser) -> str:
    """Describes the tools for chat templates that ignore ``tools`` (the text a template
    with tool support would render), in the parser's format."""
    listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    if parser.name == "llama3_json":
        how = (
            'To call a function, reply only with JSON: {"name": <function name>, '
            '"parameters": <arguments object>}; several calls are separated by ";".'
        )
    else:
        how = (
            "To call a function, reply with one block per call:\n<tool_call>\n"
            '{"name": <function name>, "arguments": <arguments object>}\n</tool_call>'
        )
    return f"You may call these functions:\n{listing}\n{how}"
