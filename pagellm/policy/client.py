"""The policy as a step around the engine client: ``PolicyClient`` stands where the
serving modules expect an AsyncLLM and passes everything through, except admission.

    add_request:  key limits (429) -> model allowed (404) -> max_tokens cap ->
                  input guardrails (400 content_filter / redacted prompt) -> engine
    each output:  output guardrails (held-back window, redaction, content_filter) ->
                  dead-loop check (finish_reason repetition) -> the serving module
    the end:      the key's slot freed and its real token use settled

The API key of the request comes from the ``api_key`` context variable the server sets
when it authenticates; the headers to send (x-ratelimit-*) go into ``response_headers``.
The policy itself is held in ``PolicyHolder`` so that a reload (SIGHUP) swaps it for new
requests while running ones finish under the one they started with.
"""

from __future__ import annotations

import contextvars
import copy
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pagellm.entrypoints.openai.serving_base import APIError
from pagellm.outputs import CompletionOutput, RequestOutput
from pagellm.policy import final_output
from pagellm.policy.cache import CachedReply, ResponseCache, bucket_key, cache_key, cacheable
from pagellm.policy.config import (
    ClassifierConfig,
    PolicyConfig,
    PolicyError,
    Rule,
    SemanticConfig,
    load_policy,
)
from pagellm.policy.guard import (
    RepetitionDetector,
    StreamFilter,
    Verdict,
    apply_rules,
    leak_rule,
)
from pagellm.policy.limits import KeyState
from pagellm.policy.routing import RouteRequest, choose
from pagellm.policy.semantic import Embedder
from pagellm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

api_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("api_key", default=None)
response_headers: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "response_headers", default=None
)
# The request's ``x-pagellm-cache`` header: "allow" opts a sampled request into the
# response cache, "skip" bypasses it (no lookup, nothing stored).
cache_mode: contextvars.ContextVar[str | None] = contextvars.ContextVar("cache_mode", default=None)


class PolicyHolder:
    """The policy in force, its per-key state and its counters (kept over reloads)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.config = load_policy(path)
        self.keys: dict[str, KeyState] = {}
        self.counts: Counter[tuple[str, ...]] = Counter()
        self.cache: ResponseCache | None = None
        self.embedder: Embedder | None = None
        # Checks a new policy against the server (its served names); set by the server.
        self.check: Callable[[PolicyConfig], None] | None = None
        self._sync_keys()

    def reload(self) -> bool:
        """Read the file again; a bad file keeps the old policy (logged). True if
        swapped."""
        try:
            config = load_policy(self.path)
            if self.check is not None:
                self.check(config)
        except PolicyError as e:
            logger.error("policy reload failed, keeping the previous policy: %s", e)
            self.counts[("reload", "failed")] += 1
            return False
        self.config = config
        self._sync_keys()
        self.counts[("reload", "ok")] += 1
        logger.info("policy reloaded from %s", self.path)
        return True

    def _sync_keys(self) -> None:
        cc = self.config.response_cache
        if cc is None:
            self.cache = None
        elif self.cache is None:
            self.cache = ResponseCache(cc)
        else:
            self.cache.config = cc  # entries kept over a reload
        old = self.keys
        self.keys = {}
        for key, limits in self.config.keys.items():
            state = old.get(key) or KeyState(limits)
            state.limits = limits
            self.keys[key] = state

    def accepts(self, token: str) -> bool:
        return token in self.config.keys

    def count(self, *labels: str) -> None:
        self.counts[labels] += 1

    def render(self) -> str:
        """The policy's Prometheus metrics."""
        lines = [
            "# HELP pagellm:policy_actions_total Guardrail rules that fired, by action.",
            "# TYPE pagellm:policy_actions_total counter",
        ]
        for labels, n in sorted(self.counts.items()):
            if labels[0] == "rule":
                _, action, stage, rule = labels
                lines.append(
                    f'pagellm:policy_actions_total{{action="{action}",stage="{stage}",'
                    f'rule="{rule}"}} {n}'
                )  # fmt: skip
        lines += [
            "# HELP pagellm:policy_repetition_stops_total Requests stopped in a dead loop.",
            "# TYPE pagellm:policy_repetition_stops_total counter",
            f"pagellm:policy_repetition_stops_total {self.counts[('repetition',)]}",
            "# HELP pagellm:policy_reloads_total Policy reloads (SIGHUP), by result.",
            "# TYPE pagellm:policy_reloads_total counter",
            f'pagellm:policy_reloads_total{{result="ok"}} {self.counts[("reload", "ok")]}',
            f'pagellm:policy_reloads_total{{result="failed"}} {self.counts[("reload", "failed")]}',
            "# HELP pagellm:key_usage_total Requests and tokens per API key (by its name).",
            "# TYPE pagellm:key_usage_total counter",
        ]
        for state in self.keys.values():
            for kind, n in state.usage.items():
                lines.append(
                    f'pagellm:key_usage_total{{key="{state.limits.name}",kind="{kind}"}} {n}'
                )
        lines += [
            "# HELP pagellm:key_inflight Requests running per API key.",
            "# TYPE pagellm:key_inflight gauge",
        ]
        for state in self.keys.values():
            lines.append(f'pagellm:key_inflight{{key="{state.limits.name}"}} {state.inflight}')
        lines += [
            "# HELP pagellm:route_requests_total Requests to a route, by the model chosen.",
            "# TYPE pagellm:route_requests_total counter",
        ]
        for labels, n in sorted(self.counts.items()):
            if labels[0] == "route":
                lines.append(
                    f'pagellm:route_requests_total{{route="{labels[1]}",side="{labels[2]}"}} {n}'
                )
        lines += [
            "# HELP pagellm:policy_classifier_total The classifier model's verdicts.",
            "# TYPE pagellm:policy_classifier_total counter",
        ]
        for labels, n in sorted(self.counts.items()):
            if labels[0] == "classifier":
                lines.append(
                    f'pagellm:policy_classifier_total{{stage="{labels[1]}",verdict="{labels[2]}"}} {n}'
                )
        if self.cache is not None:
            lines += self.cache.render()
        return "\n".join(lines) + "\n"


class PolicyClient:
    """The engine client with the policy applied at admission and on every output.

    Serving modules admit through ``admit_request`` (async: the semantic cache embeds,
    the classifier and the cascade run the model before the reply starts); ``models``
    (the server's ServingModels) resolves the served names the policy refers to."""

    def __init__(self, engine: Any, holder: PolicyHolder, models: Any = None) -> None:
        self._engine = engine
        self.policy = holder
        self.models = models
        self._ids = itertools.count()

    def __getattr__(self, name: str) -> Any:
        if name == "add_request":  # admission must go through the policy
            raise AttributeError("PolicyClient admits with admit_request")
        return getattr(self._engine, name)

    def resolve(self, name: str | None) -> tuple[str, Any]:
        if self.models is None:
            return self._engine.config.model.served_model_name, None
        return self.models.resolve(name)  # type: ignore[no-any-return]

    def check_names(self, config: PolicyConfig) -> None:
        """Every name the policy refers to is served here (PolicyError otherwise)."""
        names: list[tuple[str, str]] = []
        for r in config.routes.values():
            names += [(f"route {r.name!r}", r.small), (f"route {r.name!r}", r.large)]
        if config.classifier is not None:
            names.append(("guardrails.classifier", config.classifier.model))
        sem = config.response_cache.semantic if config.response_cache else None
        if sem is not None and sem.embedding.url is None:
            names.append(("response_cache.semantic.embedding", sem.embedding.model or ""))
        for what, name in names:
            try:
                _, target = self.resolve(name)
            except APIError:
                target = RouteRequest(name)
            if isinstance(target, RouteRequest):
                raise PolicyError(
                    f"{config.path}: {what} names {name!r}, which this server does not serve "
                    "(its base model or a --lora-modules adapter)"
                )

    async def admit_request(
        self,
        prompt: Any,
        params: Any,
        request_id: str,
        add_special_tokens: bool = True,
        priority: int = 0,
        lora_request: Any = None,
    ) -> Any:
        holder = self.policy
        config = holder.config
        key = api_key.get()
        state = holder.keys.get(key) if key is not None else None
        sink = response_headers.get()
        headers: dict[str, str] = sink if sink is not None else {}
        route = None
        if isinstance(lora_request, RouteRequest):
            if not (isinstance(params, SamplingParams) and params.pooling is None):
                raise APIError.bad_request(
                    f"`{lora_request.route}` is a route between two models; embeddings "
                    "need a model name", "model",
                )  # fmt: skip
            route = config.routes.get(lora_request.route)
            if route is None:  # a reload removed it after the name was resolved
                raise APIError(404, f"The model `{lora_request.route}` does not exist.",
                               "not_found_error", "model", "model_not_found")  # fmt: skip
            model = route.name
        elif lora_request is not None:
            model = lora_request.lora_name
        else:
            model = self._engine.config.model.served_model_name
        extra = prompt.get("policy") if isinstance(prompt, dict) else None
        system_prompt = (extra or {}).get("system")
        semantic_text = (extra or {}).get("semantic") if extra else _prompt_text(prompt)
        if isinstance(prompt, dict) and "policy" in prompt:
            prompt = {k: v for k, v in prompt.items() if k != "policy"}
        # Embedding requests (PoolingParams) are checked on input and counted; only
        # generation has max_tokens and an output to filter.
        generating = isinstance(params, SamplingParams) and params.pooling is None
        if state is not None:
            lim = state.limits
            if lim.models is not None and model not in lim.models:
                raise APIError(
                    404, f"The model `{model}` does not exist or you do not have access to it.",
                    "invalid_request_error", "model", "model_not_found",
                )  # fmt: skip
            if (generating and lim.max_tokens is not None) and (
                params.max_tokens is None or params.max_tokens > lim.max_tokens
            ):
                params.max_tokens = lim.max_tokens
        prompt = self._guard_input(config, prompt)
        text = _prompt_text(prompt)
        leak = config.prompt_leak if generating and system_prompt else None
        clf = config.classifier
        clf_out = generating and clf is not None and clf.stage in ("output", "both")
        # The output policy must see a reply as it grows to stop it in time: a request
        # for the final output only is run cumulative and its stream returns the last.
        output_policy = generating and bool(
            config.rules_for("output") or config.repetition or leak or clf_out
        )
        final_only = output_policy and params.output_kind == RequestOutputKind.FINAL_ONLY
        if final_only:
            params.output_kind = RequestOutputKind.CUMULATIVE
        entry: list[float] | None = None
        ids: list[int] | None = None  # the prompt's tokens, once something needs them
        if state is not None:
            _, ids = self._engine.input_processor.tokenize(prompt, add_special_tokens)
            est = len(ids)
            if generating:
                est += (params.max_tokens or 0) * max(1, params.n)
            entry, limit_headers = state.admit(est)
            headers.update(limit_headers)
        try:
            if clf is not None and clf.stage in ("input", "both") and text:
                verdict = await self._classify(clf, text, "input")
                headers["x-pagellm-guard-input"] = verdict
                if verdict == "unsafe" and clf.action == "block":
                    raise APIError(
                        400, "The prompt was blocked by the policy's classifier "
                        f"({clf.model}).", "invalid_request_error", "messages", "content_filter",
                    )  # fmt: skip
            cache, store = holder.cache, None
            mode = cache_mode.get()  # the request's x-pagellm-cache: allow | skip
            if cache is not None and generating and mode != "skip" and (cacheable(params) or (
                mode == "allow" and params.n == 1 and not params.use_beam_search
            )):  # fmt: skip
                if ids is None:
                    _, ids = self._engine.input_processor.tokenize(prompt, add_special_tokens)
                bucket = bucket_key((key or "", model), params)
                ckey = cache_key(bucket, ids)
                hit = cache.get(ckey)
                match, vector, score = "exact", None, None
                sem = cache.config.semantic
                if hit is None and sem is not None and semantic_text:
                    try:
                        vector = await self._embedder(sem).embed(semantic_text)
                    except (ValueError, APIError) as e:
                        logger.warning("semantic cache: no embedding, running uncached: %s", e)
                        cache.embed_errors += 1
                    if vector is not None:
                        found = cache.nearest(bucket, vector, sem.threshold_for(model))
                        if found is not None:
                            (hit, score), match = found, "semantic"
                if hit is not None:
                    headers["x-pagellm-cache"] = "hit"
                    headers["x-pagellm-cache-match"] = match
                    if score is not None:
                        headers["x-pagellm-cache-similarity"] = f"{score:.4f}"
                    if state is not None:
                        state.settle(entry, 0, 0)  # nothing ran
                    return CachedStream(request_id, text, ids, hit, match)
                cache.miss()
                headers["x-pagellm-cache"] = "miss"
                store = (cache, ckey, bucket, vector)
            answered_by = None
            if route is not None:
                if ids is None:
                    _, ids = self._engine.input_processor.tokenize(prompt, add_special_tokens)
                choice = await choose(route, self._engine, self.resolve, prompt, ids, text, params)
                holder.count("route", route.name, choice.side)
                headers["x-pagellm-route"] = choice.side
                headers["x-pagellm-model"] = answered_by = choice.model
                if choice.score is not None:
                    headers["x-pagellm-route-score"] = f"{choice.score:.4f}"
                lora_request = self.resolve(choice.model)[1]
            stream = self._engine.add_request(
                prompt, params, request_id, add_special_tokens, priority, lora_request
            )
        except BaseException:
            if state is not None:
                state.settle(entry, 0, 0)
            raise
        rules = config.rules_for("output")
        if leak is not None and system_prompt:
            rules += (leak_rule(system_prompt, leak.min_chars, leak.action),)
        ps = PolicyStream(
            stream, holder, config, output_policy, params, state, entry, final_only, store,
            rules, (self, clf) if clf_out else None, headers,
        )  # fmt: skip
        ps.model = answered_by
        return ps

    def _embedder(self, sem: SemanticConfig) -> Embedder:
        emb = self.policy.embedder
        if emb is None or emb.source != sem.embedding:
            emb = self.policy.embedder = Embedder(sem.embedding, self._engine, self.resolve)
        return emb

    async def _classify(self, clf: ClassifierConfig, text: str, stage: str) -> str:
        """The classifier model's verdict on a text: safe or unsafe (counted)."""
        body = clf.template.replace("{text}", text)
        try:
            prompt = self._engine.input_processor.apply_chat_template(
                [{"role": "user", "content": body}], True
            )
        except ValueError:
            prompt = body  # a model without a chat template reads the text itself
        params = SamplingParams(max_tokens=clf.max_tokens, temperature=0.0,
                                output_kind=RequestOutputKind.FINAL_ONLY)  # fmt: skip
        _, lora = self.resolve(clf.model)
        stream = self._engine.add_request(
            prompt, params, f"guard-{next(self._ids)}", lora_request=lora
        )
        out = await final_output(stream)
        reply = out.outputs[0].text if out is not None and out.outputs else ""
        verdict = "unsafe" if clf.unsafe.search(reply) else "safe"
        self.policy.count("classifier", stage, verdict)
        return verdict

    def _guard_input(self, config: PolicyConfig, prompt: Any) -> Any:
        rules = config.rules_for("input")
        if not rules:
            return prompt
        text = _prompt_text(prompt)
        if not text:
            return prompt  # token ids only: nothing to read
        v = apply_rules(rules, text)
        _count(self.policy, v, "input")
        if v.blocked is not None:
            raise APIError(
                400, f"The prompt was blocked by the policy rule {v.blocked.name!r}.",
                "invalid_request_error", "messages", "content_filter",
            )  # fmt: skip
        if not v.redacted:
            return prompt
        if isinstance(prompt, str):
            return v.text
        out = dict(prompt)
        out["prompt"] = v.text
        if out.get("prompt_token_ids") is not None:
            # The text as rendered (chat templates write their special tokens in it).
            tok = self._engine.input_processor.tokenizer
            ids = list(tok.encode(v.text, add_special_tokens=False))
            first = prompt["prompt_token_ids"][:1]
            bos = getattr(tok, "bos_token_id", None)
            if first and first[0] == bos and ids[:1] != first:
                ids = first + ids
            out["prompt_token_ids"] = ids
        return out


def _prompt_text(prompt: Any) -> str | None:
    """The prompt's text (None when it came as token ids only)."""
    if isinstance(prompt, str):
        return prompt
    return prompt.get("prompt") if isinstance(prompt, dict) else None


def _count(holder: PolicyHolder, v: Verdict, stage: str) -> None:
    if v.blocked is not None:
        holder.count("rule", "block", stage, v.blocked.name)
    for r in v.redacted:
        holder.count("rule", "redact", stage, r.name)
    for r in v.flagged:
        holder.count("rule", "flag", stage, r.name)


class _Choice:
    def __init__(self, config: PolicyConfig, rules: tuple[Rule, ...]) -> None:
        self.filter = StreamFilter(rules, config.hold_back_chars) if rules else None
        self.loop = RepetitionDetector(config.repetition) if config.repetition else None
        self.raw_len = 0  # raw characters seen (cumulative outputs)
        self.tokens_seen = 0
        self.sent = ""  # what has gone out (cumulative outputs)
        self.stopped: CompletionOutput | None = None


class PolicyStream:
    """A request's outputs with the output policy applied (same interface as the
    engine's RequestStream)."""

    def __init__(self, stream: Any, holder: PolicyHolder, config: PolicyConfig, active: bool,
                 params: Any,
                 state: KeyState | None, entry: list[float] | None,
                 final_only: bool = False,
                 store: tuple[ResponseCache, str, str, Any] | None = None,
                 rules: tuple[Rule, ...] = (), classify: tuple[PolicyClient, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        self._stream = stream
        self.request_id = stream.request_id
        self._holder, self._config = holder, config
        self._delta = getattr(params, "output_kind", None) == RequestOutputKind.DELTA
        self._state, self._entry = state, entry
        self._choices: dict[int, _Choice] = {}
        self._settled = state is None
        self._done = False
        self._prompt_tokens = self._completion_tokens = 0
        self._active = active
        self._final_only = final_only
        self._store = store  # (cache, key, bucket, vector): keep the reply if it ends well
        self._text, self._ids = "", []  # type: ignore[var-annotated]
        self._rules = rules  # the output rules (with this request's prompt-leak rule)
        self._classify = classify  # (client, classifier config): judge the whole reply
        self._headers = headers if headers is not None else {}
        self.model: str | None = None  # the model a route chose

    @property
    def finished(self) -> bool:
        return self._done or self._stream.finished

    def __aiter__(self) -> PolicyStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            self._settle()
            raise StopAsyncIteration
        while True:
            try:
                out = await self._stream.__anext__()
            except BaseException:
                self._settle()
                raise
            self._prompt_tokens = len(out.prompt_token_ids)
            if self._active:
                out = self._apply(out)
                if out.finished and self._classify is not None:
                    await self._judge(out)
            if out.finished or not self._final_only:
                break
        if self._delta:
            self._completion_tokens += sum(len(c.token_ids) for c in out.outputs)
        else:
            self._completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        if self._store is not None:
            self._keep(out)
        if out.finished:
            self._done = True
            self._settle()
        return out

    async def _judge(self, out: RequestOutput) -> None:
        """The classifier's verdict on each finished reply: an unsafe one is withheld
        (whole replies) or ends with content_filter (streams: its text has gone out)."""
        client, clf = self._classify  # type: ignore[misc]
        verdicts = []
        for c in out.outputs:
            ch = self._choices[c.index]
            if c.finish_reason == "content_filter" or not ch.sent:
                continue
            verdict = await client._classify(clf, ch.sent, "output")
            verdicts.append(verdict)
            if verdict == "unsafe" and clf.action == "block":
                c.finish_reason, c.stop_reason = "content_filter", None
                if not self._delta:
                    c.text = ""
        if verdicts:
            self._headers["x-pagellm-guard-output"] = "unsafe" if "unsafe" in verdicts else "safe"
            out.extra["guard_output"] = self._headers["x-pagellm-guard-output"]

    def _keep(self, out: RequestOutput) -> None:
        for c in out.outputs:
            if c.index != 0:
                continue
            if self._delta:
                self._text += c.text
                self._ids += list(c.token_ids)
            else:
                self._text, self._ids = c.text, list(c.token_ids)
            if out.finished and c.finish_reason in ("stop", "length"):
                assert self._store is not None
                cache, key, bucket, vector = self._store
                cache.put(key, CachedReply(
                    self._text, self._ids, c.finish_reason, c.stop_reason, time.monotonic(),
                    bucket,
                ), vector)  # fmt: skip

    def _apply(self, out: RequestOutput) -> RequestOutput:
        outputs = []
        for c in out.outputs:
            ch = self._choices.get(c.index)
            if ch is None:
                ch = self._choices[c.index] = _Choice(self._config, self._rules)
            if ch.stopped is not None:
                if not self._delta:
                    outputs.append(ch.stopped)
                continue
            new_tokens = c.token_ids if self._delta else c.token_ids[ch.tokens_seen :]
            ch.tokens_seen += len(new_tokens)
            delta = c.text if self._delta else c.text[ch.raw_len :]
            ch.raw_len += len(delta)
            finish = c.finish_reason
            if ch.loop is not None and finish is None and ch.loop.add(list(new_tokens)):
                finish = self._config.repetition.finish_reason  # type: ignore[union-attr]
                self._holder.count("repetition")
            text = delta
            if ch.filter is not None:
                v = ch.filter.feed(delta, final=finish is not None)
                _count(self._holder, v, "output")
                text = v.text
                if v.blocked is not None:
                    finish = "content_filter"
            ch.sent += text
            c = copy.copy(c)
            c.text = text if self._delta else ch.sent
            if finish != c.finish_reason:
                c.finish_reason, c.stop_reason = finish, None
                ch.stopped = c
            outputs.append(c)
        out.outputs = outputs
        stopped = all(ch.stopped is not None for ch in self._choices.values())
        if self._choices and stopped and not out.finished:  # the policy stopped them all
            self._stream.abort_if_unfinished()
            out.finished = True
        return out

    def _settle(self) -> None:
        if not self._settled:
            self._settled = True
            assert self._state is not None
            self._state.settle(self._entry, self._prompt_tokens, self._completion_tokens)

    def abort_if_unfinished(self) -> None:
        self._stream.abort_if_unfinished()
        self._settle()

    async def aclose(self) -> None:
        self.abort_if_unfinished()


class CachedStream:
    """A reply from the response cache, as one finished output (one chunk when the
    request streams); the prompt counts as cached."""

    def __init__(self, request_id: str, prompt: str | None, ids: list[int],
                 reply: CachedReply, match: str = "exact") -> None:  # fmt: skip
        self.request_id = request_id
        self.model: str | None = None
        self._out = RequestOutput(
            request_id, prompt, list(ids),
            [CompletionOutput(0, reply.text, list(reply.token_ids), None, None,
                              reply.finish_reason, reply.stop_reason)],
            True, num_cached_tokens=len(ids), extra={"response_cache": match},
        )  # fmt: skip
        self.finished = False

    def __aiter__(self) -> CachedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        self.finished = True
        return self._out

    def abort_if_unfinished(self) -> None:
        self.finished = True

    async def aclose(self) -> None:
        self.finished = True
