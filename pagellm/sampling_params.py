"""SamplingParams: how one request's tokens are chosen and when it stops.

Every field has a default; ``__post_init__`` validates and normalises, raising
``ValueError`` that names the offending parameter. Fields mirror vLLM's SamplingParams
so OpenAI/vLLM users find what they expect.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field
from typing import Any

from pagellm.core.structured_output import StructuredOutputsParams
from pagellm.utils import strict_kwargs

_SAMPLING_EPS = 1e-5
MAX_LOGPROBS = 20


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request carries."""

    CUMULATIVE = 0
    """The whole text and token list so far (vLLM's default)."""
    DELTA = 1
    """Only what is new since the previous output (streaming)."""
    FINAL_ONLY = 2
    """A single output when the request finishes (offline generate)."""


@strict_kwargs
@dataclass
class PoolingParams:
    """An embedding request's options."""

    dimensions: int | None = None
    """Keep the first ``dimensions`` values (Matryoshka-style), then normalize."""
    normalize: bool = True
    """Scale the vector to unit L2 norm."""
    pooling_type: str = "last"
    """last (the last prompt token's hidden state) or mean (over the prompt); set by the
    engine from its --pooling."""

    def __post_init__(self) -> None:
        if self.dimensions is not None and (
            not isinstance(self.dimensions, int)
            or isinstance(self.dimensions, bool)
            or self.dimensions < 1
        ):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}")
        if self.pooling_type not in ("last", "mean"):
            raise ValueError(f"pooling must be last or mean, got {self.pooling_type!r}")


@strict_kwargs
@dataclass
class SamplingParams:
    n: int = 1
    """Number of completions to return for the prompt."""
    best_of: int | None = None
    """Generate this many samples (>= n) and return the n with the highest cumulative logprob."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated (-2..2)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit per time it was generated (-2..2)."""
    repetition_penalty: float = 1.0
    """Divides positive / multiplies negative logits of tokens seen in prompt or output."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 keeps all."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is batched."""
    stop: list[str] | str | None = None
    """Strings that end generation; they are not included in the text."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation (kept in token_ids, not in text if special)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's context length."""
    min_tokens: int = 0
    """Generate at least this many tokens before EOS or stop_token_ids may end it."""
    logprobs: int | None = None
    """Return the log probability of each sampled token and this many top alternatives."""
    prompt_logprobs: int | None = None
    """Return log probabilities of the prompt tokens with this many top alternatives."""
    logit_bias: dict[int, float] | None = None
    """Added to the logits of the given token ids before sampling (-100..100)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text."""
    spaces_between_special_tokens: bool = True
    """Kept for vLLM compatibility; fast tokenizers decide spacing themselves."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    detokenize: bool = True
    """Produce text; False returns token ids only."""
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    """What each RequestOutput carries (cumulative, delta or final only)."""
    use_beam_search: bool = False
    """Beam search (deterministic); returns the n best of beam_width beams."""
    beam_width: int | None = None
    """Number of beams; default max(n, best_of)."""
    length_penalty: float = 1.0
    """Beam scores are divided by (generated length ** length_penalty)."""
    early_stopping: bool | str = False
    """Beam search stop rule: True (as soon as beam_width hypotheses are done), False
    (when no running beam can improve, by the usual heuristic) or "never"."""
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None
    """Constrain the output: a JSON schema, any JSON object, a regex, a choice of strings or
    a grammar (see pagellm.core.structured_output); a dict is read as its fields."""
    pooling: PoolingParams | None = None
    """Set for an embedding request (LLM.embed, /v1/embeddings): the prompt's hidden
    states are pooled into one vector and nothing is generated."""
    num_speculative_tokens: int | None = None
    """Speculative decoding for this request: None follows the engine's
    speculative_config, 0 turns it off, k > 0 proposes at most k tokens per step (never
    more than the engine's own number)."""
    _all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    _report_logprobs: bool = field(default=True, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        else:
            self.stop_token_ids = list(self.stop_token_ids)
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError):
                raise ValueError(
                    f"logit_bias must map token ids to numbers, got {self.logit_bias!r}"
                ) from None
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise ValueError(f"structured_outputs: {e}") from None
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError("structured_outputs must be StructuredOutputsParams or a dict")
            if self.use_beam_search:
                raise ValueError("structured_outputs is not supported with use_beam_search")
            self.structured_outputs.grammar_text()  # a malformed constraint fails here
        self._verify()
        if self.use_beam_search:
            self.temperature = 0.0  # beams are ranked by logprob; nothing is sampled
        if self.temperature < _SAMPLING_EPS:
            # Greedy: the other sampling knobs cannot change an argmax.
            self.temperature = 0.0
            self.top_p = 1.0
            self.top_k = -1
            self.min_p = 0.0
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _verify(self) -> None:
        def check(cond: bool, name: str, msg: str, value: object) -> None:
            if not cond:
                raise ValueError(f"{name} {msg}, got {value!r}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        check(is_int(self.n) and self.n >= 1, "n", "must be an integer of at least 1", self.n)
        if self.best_of is not None:
            check(
                is_int(self.best_of) and self.best_of >= self.n,
                "best_of",
                f"must be an integer of at least n ({self.n})",
                self.best_of,
            )
            if not self.use_beam_search and self.best_of > 1:
                check(
                    self.temperature >= _SAMPLING_EPS,
                    "best_of",
                    "needs temperature > 0 (greedy samples are all equal)",
                    self.best_of,
                )
        if self.use_beam_search:
            self._verify_beam_search()
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            check(is_num(v) and -2.0 <= v <= 2.0, name, "must be in [-2, 2]", v)
        check(
            is_num(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            "must be greater than 0",
            self.repetition_penalty,
        )
        check(
            is_num(self.temperature) and self.temperature >= 0,
            "temperature",
            "must be non-negative",
            self.temperature,
        )
        check(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        check(
            is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
            "top_k",
            "must be -1 (disabled) or at least 1",
            self.top_k,
        )
        check(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]", self.min_p)
        check(self.seed is None or is_int(self.seed), "seed", "must be an integer", self.seed)
        if self.num_speculative_tokens is not None:
            check(
                is_int(self.num_speculative_tokens) and self.num_speculative_tokens >= 0,
                "num_speculative_tokens",
                "must be a non-negative integer",
                self.num_speculative_tokens,
            )
        if self.max_tokens is not None:
            check(
                is_int(self.max_tokens) and self.max_tokens >= 1,
                "max_tokens",
                "must be at least 1",
                self.max_tokens,
            )
        check(
            is_int(self.min_tokens) and self.min_tokens >= 0,
            "min_tokens",
            "must be a non-negative integer",
            self.min_tokens,
        )
        if self.max_tokens is not None:
            check(
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"must not exceed max_tokens ({self.max_tokens})",
                self.min_tokens,
            )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None:
                check(
                    is_int(v) and 0 <= v <= MAX_LOGPROBS,
                    name,
                    f"must be an integer in [0, {MAX_LOGPROBS}]",
                    v,
                )
        assert isinstance(self.stop, list)
        for s in self.stop:
            check(isinstance(s, str) and s != "", "stop", "must hold non-empty strings", s)
        assert isinstance(self.stop_token_ids, list)
        for t in self.stop_token_ids:
            check(is_int(t) and t >= 0, "stop_token_ids", "must hold token ids", t)
        if self.logit_bias:
            for tok, bias in self.logit_bias.items():
                check(tok >= 0, "logit_bias", "keys must be token ids", tok)
                check(-100 <= bias <= 100, "logit_bias", "values must be in [-100, 100]", bias)
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")

    def _verify_beam_search(self) -> None:
        width = self.beam_width if self.beam_width is not None else max(self.n, self.best_of or 1)
        if not isinstance(width, int) or isinstance(width, bool) or width < self.n:
            raise ValueError(
                f"beam_width must be an integer of at least n ({self.n}), got {width!r}"
            )
        self.beam_width = width
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(
                f"early_stopping must be true, false or 'never', got {self.early_stopping!r}"
            )
        if not isinstance(self.length_penalty, (int, float)) or isinstance(
            self.length_penalty, bool
        ):
            raise ValueError(f"length_penalty must be a number, got {self.length_penalty!r}")
        unsupported = {
            "top_k": self.top_k != -1,
            "top_p": self.top_p != 1.0,
            "min_p": self.min_p != 0.0,
            "presence_penalty": self.presence_penalty != 0.0,
            "frequency_penalty": self.frequency_penalty != 0.0,
            "repetition_penalty": self.repetition_penalty != 1.0,
            "logit_bias": bool(self.logit_bias),
            "min_tokens": self.min_tokens != 0,
            "stop": bool(self.stop),
            "prompt_logprobs": self.prompt_logprobs is not None,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"{bad[0]} is not supported with use_beam_search")

    @property
    def num_samples(self) -> int:
        """How many sequences are generated: best_of (or n) samples, or 1 beam-search root."""
        if self.use_beam_search:
            return 1
        return self.best_of if self.best_of is not None else self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def all_stop_token_ids(self) -> set[int]:
        return self._all_stop_token_ids

    def update_from_eos(self, eos_token_ids: tuple[int, ...]) -> None:
        """Record the model's EOS ids so min_tokens can hold them back too."""
        self._all_stop_token_ids = set(self.stop_token_ids or ()) | (
            set() if self.ignore_eos else set(eos_token_ids)
        )

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)
