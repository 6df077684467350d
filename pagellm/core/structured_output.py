"""Structured outputs: the constraint a request's text must follow, and the CPU side that
enforces it (owned by the scheduler; no torch, no model).

    StructuredOutputsParams        what the user asked: a JSON schema, any JSON object,
                                   a regex, a choice of strings, or a grammar (Lark or
                                   GBNF/EBNF such as vLLM's guided_grammar)
    grammar_for(params)            -> the backend's grammar text (validated: ValueError)
    StructuredOutputManager        compiles grammars on a thread pool (a request waits
                                   until its grammar is ready; compiled grammars are
                                   cached by a hash of the grammar text), keeps one
                                   matcher per request, writes the step's token bitmask
                                   (int32 words, bit t of word t // 32 = token t allowed)
                                   for the constrained requests that sample, and advances
                                   the matchers with accepted tokens (rollback exists for
                                   speculative decoding).

The worker applies the bitmask in the sampler, to the constrained rows only. When a
matcher has nothing left to accept, the request finishes with "stop".

Backends (``--structured-outputs-backend``), both vLLM backends:
  llguidance  the default ("auto"): a dependency; JSON schema, regex and Lark are native
              to it, and it also validates every constraint when a request arrives.
  xgrammar    used when installed (``pip install --no-deps xgrammar apache-tvm-ffi``; its
              declared triton dependency is for GPU kernels only). It takes GBNF/EBNF
              grammars but not Lark: a Lark grammar goes to llguidance even then.
Measured on SmolLM2's tokenizer (docs/benchmarks.md): both compile a JSON schema in under
a millisecond, but along the same token paths llguidance's mask + accept costs ~0.15 ms a
token on average against ~0.7 ms for xgrammar (whose masks inside strings are slow), so
auto picks llguidance.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

BACKENDS = ("llguidance", "xgrammar")


def available_backends() -> list[str]:
    """The backends importable here (llguidance always is: it is a dependency)."""
    names = ["llguidance"]
    try:
        import xgrammar  # noqa: F401
    except Exception:  # not installed, or its native library does not load
        pass
    else:
        names.append("xgrammar")
    return names


@dataclass
class StructuredOutputsParams:
    """One constraint on a request's output; exactly one of the fields is set."""

    json: dict[str, Any] | str | None = None
    """A JSON schema (dict or its text): the output is JSON valid against it."""
    json_object: bool = False
    """Any JSON object (OpenAI's response_format json_object)."""
    regex: str | None = None
    """The whole output matches this regular expression."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """A grammar: Lark syntax, or GBNF/EBNF (``root ::= ...``, vLLM's guided_grammar)."""
    whitespace_flexible: bool = False
    """JSON: allow any whitespace between tokens (default: compact JSON)."""
    strict: bool = True
    """JSON schema: an object that lists ``properties`` and does not say
    ``additionalProperties`` allows only the listed keys (xgrammar's strict mode, OpenAI's
    ``strict: true``); False keeps JSON Schema's own default (any extra key)."""
    _grammar: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        kinds = [
            name
            for name, value in (
                ("json", self.json is not None),
                ("json_object", self.json_object),
                ("regex", self.regex is not None),
                ("choice", self.choice is not None),
                ("grammar", self.grammar is not None),
            )
            if value
        ]
        if len(kinds) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, json_object, regex, choice, "
                f"grammar; got {', '.join(kinds) or 'none'}"
            )
        if self.choice is not None and (
            not isinstance(self.choice, list)
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError(
                "structured_outputs.choice must be a non-empty list of non-empty strings"
            )
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError("structured_outputs.json must be a JSON schema object")
        if not isinstance(self.strict, bool):
            raise ValueError("structured_outputs.strict must be true or false")
        if self.json is not None and self.strict:
            self.json = strict_schema(self.json)

    @property
    def kind(self) -> str:
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"

    def grammar_text(self) -> str:
        """The backend's grammar (built once, validated: ValueError naming the problem)."""
        if self._grammar is None:
            self._grammar = grammar_for(self)
        return self._grammar


_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else",
               "additionalProperties", "unevaluatedItems", "propertyNames")  # fmt: skip


def strict_schema(schema: Any, closed: bool = True) -> Any:
    """A copy of ``schema`` in which every object that lists ``properties`` and says
    nothing of ``additionalProperties`` (or ``unevaluatedProperties``) gets
    ``additionalProperties: false``: only its listed keys. An object schema without
    ``properties`` (``{"type": "object"}``) stays any object. The branches of an
    ``allOf`` are not closed themselves (each would forbid the others' keys); their
    nested schemas are."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: strict_schema(v) for k, v in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(v) for v in out[key]]
    for key in _SCHEMA_ONE:
        if isinstance(out.get(key), dict | list):
            out[key] = strict_schema(out[key])
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [strict_schema(v, closed=False) for v in out["allOf"]]
    if (
        closed
        and isinstance(out.get("properties"), dict)
        and "additionalProperties" not in out
        and "unevaluatedProperties" not in out
        and "patternProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


def _lark_string(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Lark string literal


def grammar_for(params: StructuredOutputsParams) -> str:
    """llguidance grammar text for a constraint; ValueError when it is malformed."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import gbnf_to_lark

    options: Any = {"whitespace_flexible": params.whitespace_flexible}
    kind = params.kind
    if kind == "json":
        grammar = LLMatcher.grammar_from_json_schema(params.json, defaults=options)  # type: ignore[arg-type]
    elif kind == "json_object":
        grammar = LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=options)
    elif kind == "regex":
        assert params.regex is not None
        grammar = LLMatcher.grammar_from_regex(params.regex)
    elif kind == "choice":
        assert params.choice is not None
        grammar = LLMatcher.grammar_from_lark(
            "start: " + " | ".join(_lark_string(c) for c in params.choice)
        )
    else:
        assert params.grammar is not None
        text = params.grammar
        if re.search(r"^\s*[A-Za-z_][\w-]*\s*::=", text, re.MULTILINE):
            try:
                text = gbnf_to_lark(text)  # GBNF / EBNF (root ::= ...)
            except Exception as e:
                raise ValueError(f"structured_outputs.grammar is not valid GBNF: {e}") from None
        grammar = LLMatcher.grammar_from_lark(text)
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"invalid structured_outputs.{kind}: {_first_lines(error)}")
    return str(grammar)


def _first_lines(message: str, n: int = 6) -> str:
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return " / ".join(lines[:n])


def _is_gbnf(text: str) -> bool:
    return re.search(r"^\s*[A-Za-z_][\w-]*\s*::=", text, re.MULTILINE) is not None


# JSON-schema keywords xgrammar 0.2 does not enforce (or enforces only in part).
_XGRAMMAR_UNENFORCED = frozenset(
    ("multipleOf", "uniqueItems", "contains", "minContains", "maxContains", "not", "if",
     "then", "else", "dependentRequired", "dependentSchemas", "propertyNames",
     "patternProperties", "minProperties", "maxProperties", "allOf",
     "unevaluatedProperties", "unevaluatedItems")
)  # fmt: skip


def _xgrammar_gaps(schema: Any) -> bool:
    if isinstance(schema, list):
        return any(_xgrammar_gaps(x) for x in schema)
    if not isinstance(schema, dict):
        return False
    if _XGRAMMAR_UNENFORCED.intersection(schema):
        return True
    if ("format" in schema or "pattern" in schema) and (
        "minLength" in schema or "maxLength" in schema
    ):
        return True
    return any(_xgrammar_gaps(v) for v in schema.values() if isinstance(v, dict | list))


class _LLGuidance:
    """llguidance: a compiled grammar is a matcher in its start state; requests copy it."""

    name = "llguidance"

    def __init__(self, tokenizer: Callable[[], Any], vocab_size: int, eos: list[int]) -> None:
        import llguidance.hf

        self._tok = llguidance.hf.from_tokenizer(
            tokenizer(), n_vocab=vocab_size, eos_token=eos or None
        )

    @staticmethod
    def cache_key(params: StructuredOutputsParams) -> str:
        return params.grammar_text()

    def compile(self, params: StructuredOutputsParams) -> Any:
        from llguidance import LLMatcher

        matcher = LLMatcher(self._tok, params.grammar_text(), log_level=0)
        if matcher.is_error():
            raise ValueError(f"the grammar does not compile: {_first_lines(matcher.get_error())}")
        return matcher

    def new_matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fork(self, matcher: Any) -> Any:
        return matcher.deep_copy()

    def fill(self, matcher: Any, mask: np.ndarray, row: int) -> None:
        import llguidance.numpy as lln

        lln.fill_next_token_bitmask(matcher, mask, row)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def error(self, matcher: Any) -> str:
        return str(matcher.get_error())

    def finished(self, matcher: Any) -> bool:
        return bool(matcher.is_stopped())

    def rollback(self, matcher: Any, num_tokens: int) -> None:
        matcher.rollback(num_tokens)


class _XGrammar:
    """xgrammar: a compiled grammar is shared; each request gets a GrammarMatcher."""

    name = "xgrammar"

    def __init__(self, tokenizer: Callable[[], Any], vocab_size: int, eos: list[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer(), vocab_size=vocab_size, stop_token_ids=eos or None
        )
        self._eos = set(eos)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._words = (vocab_size + 31) // 32

    @staticmethod
    def takes(params: StructuredOutputsParams) -> bool:
        """Whether xgrammar enforces the constraint exactly. It reads no Lark, and it drops
        some JSON-schema keywords with at most a warning (a string's length beside a
        format or pattern, for one: measured); such constraints go to llguidance, which
        validated every constraint at intake and so enforces it."""
        if params.grammar is not None:
            return _is_gbnf(params.grammar)
        return params.json is None or not _xgrammar_gaps(params.json)

    @staticmethod
    def cache_key(params: StructuredOutputsParams) -> str:
        fields = {k: getattr(params, k) for k in ("json", "json_object", "regex", "choice")}
        fields.update(grammar=params.grammar, ws=params.whitespace_flexible)
        return json.dumps(fields, sort_keys=True)

    def compile(self, params: StructuredOutputsParams) -> Any:
        c = self._compiler
        ws = params.whitespace_flexible
        # Compact JSON, as llguidance writes it, unless whitespace is asked to be flexible.
        sep = None if ws else (",", ":")
        try:
            if params.json is not None:
                return c.compile_json_schema(
                    json.dumps(params.json), any_whitespace=ws, separators=sep, strict_mode=False
                )
            if params.json_object:
                return c.compile_json_schema(
                    json.dumps({"type": "object"}), any_whitespace=ws, separators=sep
                )
            if params.regex is not None:
                return c.compile_regex(params.regex)
            if params.choice is not None:
                return c.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(x) for x in params.choice)
                )
            assert params.grammar is not None
            return c.compile_grammar(params.grammar)
        except RuntimeError as e:  # its parsers report errors this way
            raise ValueError(f"xgrammar does not compile the constraint: {e}") from None

    def new_matcher(self, compiled: Any) -> Any:
        return self._xgr.GrammarMatcher(compiled, max_rollback_tokens=-1)

    def fork(self, matcher: Any) -> Any:
        return matcher.fork()

    def fill(self, matcher: Any, mask: np.ndarray, row: int) -> None:
        import torch

        matcher.fill_next_token_bitmask(torch.from_numpy(mask), row)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def error(self, matcher: Any) -> str:
        return "the token is not allowed by the grammar"

    def finished(self, matcher: Any) -> bool:
        if matcher.is_terminated():
            return True
        if not matcher.is_completed():
            return False
        # The grammar may end here; it is finished when nothing but a stop token may follow.
        row = np.empty((1, self._words), dtype=np.int32)
        self.fill(matcher, row, 0)
        allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
        return all(int(t) in self._eos for t in allowed)

    def rollback(self, matcher: Any, num_tokens: int) -> None:
        matcher.rollback(num_tokens)


class StructuredOutputManager:
    """Grammar compilation, the per-request matchers and the step bitmask (CPU side).

    ``tokenizer`` returns the model's Hugging Face tokenizer; it is called once per
    backend, on the compile thread, when the first constrained request arrives."""

    def __init__(
        self,
        tokenizer: Callable[[], Any],
        vocab_size: int,
        eos_token_ids: tuple[int, ...],
        backend: str = "llguidance",
        max_workers: int = 1,
    ) -> None:
        if backend == "auto":
            backend = "llguidance"
        if backend not in available_backends():
            hint = (
                " (pip install --no-deps xgrammar apache-tvm-ffi)" if backend == "xgrammar" else ""
            )
            raise ValueError(
                f"structured outputs backend {backend!r} is not available{hint}; "
                f"available: {', '.join(available_backends())}"
            )
        self.backend = backend
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._tokenizer = tokenizer
        self._eos = list(eos_token_ids)
        self._backends: dict[str, Any] = {}
        self._backends_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers, thread_name_prefix="pagellm-grammar"
        )
        # key -> future of (backend, compiled grammar)
        self._cache: dict[str, concurrent.futures.Future[tuple[Any, Any]]] = {}
        self._matchers: dict[str, tuple[Any, Any]] = {}  # req_id -> (backend, matcher)
        self._pending: dict[str, concurrent.futures.Future[tuple[Any, Any]]] = {}
        self._lock = threading.Lock()

    def get_backend(self, name: str) -> Any:
        """The grammar engine `name` (llguidance or xgrammar), built on first use."""
        with self._backends_lock:
            if name not in self._backends:
                cls: Any = _XGrammar if name == "xgrammar" else _LLGuidance
                self._backends[name] = cls(self._tokenizer, self.vocab_size, self._eos)
            return self._backends[name]

    def _backend_name_for(self, params: StructuredOutputsParams) -> str:
        if self.backend == "xgrammar" and _XGrammar.takes(params):
            return "xgrammar"
        return "llguidance"

    def _compile(self, name: str, params: StructuredOutputsParams) -> tuple[Any, Any]:
        backend = self.get_backend(name)
        return backend, backend.compile(params)

    # ---- per request ---------------------------------------------------------------------

    def add(self, req_id: str, params: StructuredOutputsParams) -> None:
        """Start compiling a request's grammar (or reuse the cached compile)."""
        name = self._backend_name_for(params)
        cls = _XGrammar if name == "xgrammar" else _LLGuidance
        key = hashlib.sha256(f"{name}\0{cls.cache_key(params)}".encode()).hexdigest()
        with self._lock:
            future = self._cache.get(key)
            if future is None:
                future = self._pool.submit(self._compile, name, params)
                self._cache[key] = future
            self._pending[req_id] = future

    def fork(self, parent_id: str, child_id: str) -> None:
        """A sibling starts where its parent is (n > 1)."""
        if parent_id in self._matchers:
            backend, matcher = self._matchers[parent_id]
            self._matchers[child_id] = (backend, backend.fork(matcher))
        elif parent_id in self._pending:
            self._pending[child_id] = self._pending[parent_id]

    def is_ready(self, req_id: str) -> bool:
        """Whether the request may be scheduled (its matcher exists, or it has none)."""
        future = self._pending.get(req_id)
        if future is None:
            return True
        if not future.done():
            return False
        self._pending.pop(req_id)
        try:
            backend, compiled = future.result()
        except Exception:
            logger.exception("compiling a grammar failed (request %s)", req_id)
            return True
        self._matchers[req_id] = (backend, backend.new_matcher(compiled))
        return True

    def failed(self, req_id: str) -> bool:
        """A constrained request whose grammar did not compile (it is finished)."""
        return req_id not in self._matchers and req_id not in self._pending

    def has(self, req_id: str) -> bool:
        return req_id in self._matchers

    def free(self, req_id: str) -> None:
        self._matchers.pop(req_id, None)
        self._pending.pop(req_id, None)

    # ---- per step ------------------------------------------------------------------------

    def bitmask(self, req_ids: list[str]) -> np.ndarray:
        """[len(req_ids), words] int32: the tokens each request may sample next."""
        mask = np.empty((len(req_ids), self.words), dtype=np.int32)
        for i, req_id in enumerate(req_ids):
            backend, matcher = self._matchers[req_id]
            backend.fill(matcher, mask, i)
        return mask

    def bitmask_with_drafts(self, req_id: str, drafts: list[int]) -> tuple[np.ndarray, int]:
        """Allowed-token rows for verifying speculative proposals: row i for the position
        after drafts[:i]. Stops at the first proposal the grammar refuses; returns the
        rows (1 + the number of valid proposals) and that number. The matcher ends where
        it started (advanced through the valid proposals, then rolled back)."""
        backend, matcher = self._matchers[req_id]
        mask = np.empty((len(drafts) + 1, self.words), dtype=np.int32)
        valid = 0
        for i, tok in enumerate(drafts):
            backend.fill(matcher, mask, i)
            word = int(mask[i, tok >> 5]) if (tok >> 5) < self.words else 0
            if not (word >> (tok & 31)) & 1 or not backend.accept(matcher, tok):
                break
            valid = i + 1
        if valid == len(drafts):
            backend.fill(matcher, mask, valid)
        if valid:
            backend.rollback(matcher, valid)
        return mask[: valid + 1], valid

    def accept(self, req_id: str, token_ids: list[int]) -> bool:
        """Advance the request's matcher; True when the grammar is complete (the request
        should stop) or was violated (it cannot go on)."""
        entry = self._matchers.get(req_id)
        if entry is None:
            return False
        backend, matcher = entry
        for tok in token_ids:
            if not backend.accept(matcher, tok):
                logger.warning("request %s left its grammar: %s", req_id, backend.error(matcher))
                return True
        return bool(backend.finished(matcher))

    def rollback(self, req_id: str, num_tokens: int) -> None:
        entry = self._matchers.get(req_id)
        if entry is not None and num_tokens:
            entry[0].rollback(entry[1], num_tokens)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
