"""Ray Data batch inference: offline generation over a ``ray.data.Dataset``.

    Dataset --map(preprocess)--> map_batches(PagellmPredictor) --map(postprocess)--> Dataset
                                 one actor = one pagellm.LLM,
                                 one LLM.generate call per batch

``PagellmPredictor`` is the callable class Ray Data runs in an actor pool
(``ds.map_batches(PagellmPredictor, fn_constructor_kwargs=..., concurrency=N, ...)``): it
builds its engine once, in ``__init__``, and generates each batch with one
``LLM.generate`` call, so the rows of a batch share the engine's continuous batching.
``build_processor`` / ``PagellmProcessor`` wrap that into a ``Dataset -> Dataset``
callable in the shape of Ray's own ``ray.data.llm.build_processor`` (a config, optional
row-wise preprocess and postprocess).

Rows in: ``prompt_token_ids`` (token ids), else ``messages`` (a chat, rendered with the
model's chat template as ``LLM.chat`` does), else ``prompt`` (text), the first one that
is not null; an optional ``sampling_params`` column (a dict or its JSON text) merged over
the processor's defaults. Rows out: every input column, plus ``generated_text``,
``generated_token_ids``, ``num_prompt_tokens``, ``num_generated_tokens``,
``finish_reason`` and ``error`` (None, or why this row produced nothing). A bad row (a
bad sampling parameter, a prompt too long for ``max_model_len``, no prompt at all) gets
its ``error`` and the other rows of its batch are generated as usual; only an engine
failure fails the batch (Ray Data then retries or fails the job).

Arrow stores a dict column as a struct holding the union of all rows' keys, so a key a
row did not set reads back as None: None in ``sampling_params`` means "not set" (the
default applies). For nested dicts whose keys vary between rows (``logit_bias``,
``structured_outputs``), give ``sampling_params`` as JSON text.

Importing this module imports neither Ray nor torch; the actor imports pagellm's engine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa
    from ray.data import Dataset

    from pagellm.entrypoints.llm import LLM
    from pagellm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = [
    "OUTPUT_COLUMNS",
    "PagellmPredictor",
    "PagellmProcessor",
    "PagellmProcessorConfig",
    "build_processor",
]

OUTPUT_COLUMNS = (
    "generated_text",
    "generated_token_ids",
    "num_prompt_tokens",
    "num_generated_tokens",
    "finish_reason",
    "error",
)
"""The columns the predictor adds (an input column of the same name is replaced)."""

PROMPT_COLUMNS = ("prompt_token_ids", "messages", "prompt")
"""Where a row's prompt is read from, in this order of precedence."""

Row = dict[str, Any]


@dataclass
class PagellmProcessorConfig:
    """How a processor runs: the engine each actor builds and the actor pool around it.
    Mirrors the fields of Ray's ``ray.data.llm.ProcessorConfig`` where they apply."""

    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """``pagellm.LLM`` keyword arguments (EngineArgs fields: model, max_model_len,
    kv_cache_memory, ...). Without ``num_threads`` an actor uses one thread per CPU Ray
    gave it."""
    sampling_params: dict[str, Any] = field(default_factory=dict)
    """Default SamplingParams fields; a row's ``sampling_params`` are merged over them."""
    batch_size: int = 64
    """Rows per ``LLM.generate`` call. Larger batches keep the engine's running batch
    fuller (throughput); smaller ones lose less work when an actor fails."""
    concurrency: int | tuple[int, int] = 1
    """Actors (engines): n for a fixed pool, (m, n) for a pool autoscaling from m to n."""
    num_cpus_per_actor: float | None = None
    """CPUs Ray reserves per actor (and, rounded down, its engine's threads); default 1."""
    num_gpus_per_actor: float = 0
    """GPUs per actor: 1 on GPU nodes (the engine then runs on CUDA), 0 on CPU."""
    accelerator_type: str | None = None
    """Ray accelerator type the actors need (e.g. "H100"); None: any."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of the chat template for ``messages`` rows (e.g. enable_thinking)."""
    runtime_env: dict[str, Any] | None = None
    """Ray runtime_env of the actors (env vars, pip packages)."""

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        c = self.concurrency
        if isinstance(c, int) and not isinstance(c, bool):
            ok = c >= 1
        elif isinstance(c, tuple) and len(c) == 2:
            ok = all(isinstance(x, int) and x >= 1 for x in c) and c[0] <= c[1]
        else:
            ok = False
        if not ok:
            raise ValueError(f"concurrency must be n >= 1 or (m, n) with 1 <= m <= n, got {c!r}")
        if self.num_cpus_per_actor is not None and self.num_cpus_per_actor <= 0:
            raise ValueError(
                f"num_cpus_per_actor must be positive, got {self.num_cpus_per_actor!r}"
            )
        if self.num_gpus_per_actor < 0:
            raise ValueError(
                f"num_gpus_per_actor must be non-negative, got {self.num_gpus_per_actor!r}"
            )
        self.sampling_params = sampling_dict(self.sampling_params)
        _make_params(self.sampling_params, None)  # bad defaults fail here, not in every row


class PagellmPredictor:
    """The Ray Data UDF: one ``pagellm.LLM`` per instance (per actor), one
    ``LLM.generate`` call per batch. Batches are Arrow tables (``batch_format="pyarrow"``);
    the returned table has the input's rows in their order, its columns untouched, plus
    ``OUTPUT_COLUMNS``."""

    def __init__(
        self,
        engine_kwargs: Mapping[str, Any] | None = None,
        sampling_params: Mapping[str, Any] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        from pagellm.entrypoints.llm import LLM

        kwargs = dict(engine_kwargs or {})
        if kwargs.get("num_threads") is None:
            threads = _assigned_cpus()
            if threads is not None:
                kwargs["num_threads"] = threads
        self.defaults = sampling_dict(sampling_params)
        _make_params(self.defaults, None)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.llm: LLM = LLM(**kwargs)
        logger.info("pagellm Ray Data actor ready (threads: %s)", kwargs.get("num_threads"))

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        rows: list[Row] = batch.to_pylist()
        results: list[Row] = [_error_result("not run") for _ in rows]
        staged: list[tuple[int, dict[str, Any], SamplingParams]] = []
        for i, row in enumerate(rows):
            try:
                prompt, params = self._prepare(row)
            except (ValueError, TypeError) as e:
                results[i] = _error_result(str(e))
                continue
            staged.append((i, prompt, params))
        for (i, _, _), res in zip(staged, self._generate(staged)):
            results[i] = res
        # Typed columns: a batch whose rows all failed (or all succeeded) still has the
        # schema of the others, so Ray Data's blocks concatenate.
        types = {
            "generated_text": pa.string(),
            "generated_token_ids": pa.list_(pa.int64()),
            "num_prompt_tokens": pa.int64(),
            "num_generated_tokens": pa.int64(),
            "finish_reason": pa.string(),
            "error": pa.string(),
        }
        out = batch.drop_columns([c for c in OUTPUT_COLUMNS if c in batch.column_names])
        for col in OUTPUT_COLUMNS:
            out = out.append_column(col, pa.array([r[col] for r in results], type=types[col]))
        return out

    def _prepare(self, row: Row) -> tuple[dict[str, Any], SamplingParams]:
        """The row's prompt (as token ids, with its text) and SamplingParams, checked as
        the engine checks them; ValueError names what is wrong with the row."""
        ip = self.llm.engine.input_processor
        kind, value = _prompt_of(row)
        if kind == "prompt_token_ids":
            prompt: dict[str, Any] = {"prompt_token_ids": list(_to_python(value))}
        else:
            if kind == "messages":
                messages = _messages_of(value)
                text = ip.apply_chat_template(messages, True, None, **self.chat_template_kwargs)
                special = False  # the template already holds any BOS token (as LLM.chat)
            else:
                if not isinstance(value, str):
                    raise ValueError(f"prompt must be text, got {type(value).__name__}")
                text, special = value, True
            _, ids = ip.tokenize(text, add_special_tokens=special)
            prompt = {"prompt": text, "prompt_token_ids": ids}
        params = _make_params(self.defaults, row.get("sampling_params"))
        ip.process("check", prompt, params.clone())  # lengths, token ranges: nothing queued
        return prompt, params

    def _generate(self, staged: list[tuple[int, dict[str, Any], SamplingParams]]) -> list[Row]:
        """One LLM.generate call for all the staged rows; should the engine still refuse
        one of them (ValueError: nothing stays queued), each row is run alone so that only
        the bad one fails."""
        if not staged:
            return []
        prompts: list[Any] = [p for _, p, _ in staged]
        params = [sp for _, _, sp in staged]
        try:
            outs = self.llm.generate(prompts, params, use_tqdm=False)
        except ValueError as e:
            logger.warning("a batch of %d rows was refused (%s); running its rows one by one",
                           len(prompts), e)  # fmt: skip
            results = []
            for p, sp in zip(prompts, params):
                try:
                    results.append(_result(self.llm.generate([p], [sp], use_tqdm=False)[0]))
                except ValueError as row_error:
                    results.append(_error_result(str(row_error)))
            return results
        return [_result(o) for o in outs]


class PagellmProcessor:
    """``Dataset -> Dataset``: optional row-wise ``preprocess`` (its dict is merged over
    the row, so input columns are kept, as in Ray's processors), the predictor's actor
    pool, optional row-wise ``postprocess`` (its dict is the output row; return
    ``{**row, ...}`` to keep columns; it also sees failed rows, whose ``error`` is set).
    Building it starts nothing; the dataset runs when it is consumed."""

    def __init__(
        self,
        config: PagellmProcessorConfig,
        preprocess: Callable[[Row], Row] | None = None,
        postprocess: Callable[[Row], Row] | None = None,
        preprocess_map_kwargs: dict[str, Any] | None = None,
        postprocess_map_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.preprocess = preprocess
        self.postprocess = postprocess
        self.preprocess_map_kwargs = dict(preprocess_map_kwargs or {})
        self.postprocess_map_kwargs = dict(postprocess_map_kwargs or {})

    def map_batches_kwargs(self) -> dict[str, Any]:
        """The ``Dataset.map_batches`` arguments of the generation stage."""
        c = self.config
        kwargs: dict[str, Any] = {
            "fn_constructor_kwargs": {
                "engine_kwargs": dict(c.engine_kwargs),
                "sampling_params": dict(c.sampling_params),
                "chat_template_kwargs": dict(c.chat_template_kwargs),
            },
            "batch_size": c.batch_size,
            "batch_format": "pyarrow",
            "concurrency": c.concurrency,
            "num_cpus": 1 if c.num_cpus_per_actor is None else c.num_cpus_per_actor,
        }
        if c.num_gpus_per_actor:
            kwargs["num_gpus"] = c.num_gpus_per_actor
        if c.accelerator_type is not None:
            kwargs["accelerator_type"] = c.accelerator_type
        if c.runtime_env is not None:
            kwargs["runtime_env"] = c.runtime_env
        return kwargs

    def __call__(self, dataset: Dataset) -> Dataset:
        self._warn_if_actors_take_every_cpu()
        if self.preprocess is not None:
            dataset = dataset.map(_MergeRow(self.preprocess), **self.preprocess_map_kwargs)
        dataset = dataset.map_batches(PagellmPredictor, **self.map_batches_kwargs())
        if self.postprocess is not None:
            dataset = dataset.map(self.postprocess, **self.postprocess_map_kwargs)
        return dataset

    def _warn_if_actors_take_every_cpu(self) -> None:
        """Actors holding every CPU of the cluster starve Ray Data's read and map tasks:
        the job then waits forever (seen on Ray 2.60 with ray.data.range + preprocess)."""
        import ray

        if not ray.is_initialized():
            return
        c = self.config
        actors = c.concurrency if isinstance(c.concurrency, int) else c.concurrency[1]
        wanted = actors * (1 if c.num_cpus_per_actor is None else c.num_cpus_per_actor)
        total = ray.cluster_resources().get("CPU", 0)
        if total and wanted >= total:
            logger.warning(
                "the pagellm actors take %s of the cluster's %s CPUs: Ray Data's read, "
                "preprocess and postprocess tasks may never get one and the job then hangs; "
                "leave a CPU free (num_cpus_per_actor), the engine may still use it "
                "(engine_kwargs num_threads)",
                wanted,
                total,
            )


def build_processor(
    engine_kwargs: Mapping[str, Any] | None = None,
    sampling: Mapping[str, Any] | SamplingParams | None = None,
    *,
    concurrency: int | tuple[int, int] = 1,
    batch_size: int = 64,
    num_cpus_per_actor: float | None = None,
    num_gpus_per_actor: float = 0,
    accelerator_type: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    runtime_env: dict[str, Any] | None = None,
    preprocess: Callable[[Row], Row] | None = None,
    postprocess: Callable[[Row], Row] | None = None,
    preprocess_map_kwargs: dict[str, Any] | None = None,
    postprocess_map_kwargs: dict[str, Any] | None = None,
) -> PagellmProcessor:
    """A ``Dataset -> Dataset`` processor; the arguments are PagellmProcessorConfig's
    fields (``sampling`` is its default sampling_params: a dict or a SamplingParams)
    and PagellmProcessor's row functions."""
    config = PagellmProcessorConfig(
        engine_kwargs=dict(engine_kwargs or {}),
        sampling_params=sampling_dict(sampling),
        batch_size=batch_size,
        concurrency=concurrency,
        num_cpus_per_actor=num_cpus_per_actor,
        num_gpus_per_actor=num_gpus_per_actor,
        accelerator_type=accelerator_type,
        chat_template_kwargs=dict(chat_template_kwargs or {}),
        runtime_env=runtime_env,
    )
    return PagellmProcessor(
        config, preprocess, postprocess, preprocess_map_kwargs, postprocess_map_kwargs
    )


def sampling_dict(sampling: Mapping[str, Any] | SamplingParams | None) -> dict[str, Any]:
    """SamplingParams fields as a dict: a SamplingParams gives the public fields that
    differ from their defaults (after its own normalisation: greedy drops top_p/top_k)."""
    if sampling is None:
        return {}
    if isinstance(sampling, Mapping):
        return dict(sampling)
    if not dataclasses.is_dataclass(sampling):
        raise ValueError(
            f"sampling must be a dict or SamplingParams, got {type(sampling).__name__}"
        )
    from pagellm.sampling_params import SamplingParams

    default = SamplingParams()
    out = {}
    for f in dataclasses.fields(sampling):
        if f.name.startswith("_") or f.name == "output_kind":
            continue
        value = getattr(sampling, f.name)
        if value != getattr(default, f.name):
            out[f.name] = value
    return out


# ---- rows ------------------------------------------------------------------------------


class _MergeRow:
    """preprocess(row) merged over row (a class, not a closure: clean to pickle)."""

    def __init__(self, fn: Callable[[Row], Row]) -> None:
        self.fn = fn

    def __call__(self, row: Row) -> Row:
        return {**row, **self.fn(row)}


def _prompt_of(row: Row) -> tuple[str, Any]:
    for col in PROMPT_COLUMNS:
        value = row.get(col)
        if not _is_null(value):
            return col, value
    raise ValueError(
        f"the row has none of the columns {', '.join(PROMPT_COLUMNS)} (or all are null)"
    )


def _messages_of(value: Any) -> list[dict[str, Any]]:
    """A chat as a list of plain dicts; keys Arrow filled with None (a struct column holds
    the union of every row's keys) are dropped, content excepted."""
    messages = _to_python(value)
    if isinstance(messages, str):
        messages = json.loads(messages)
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of chat messages")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise ValueError("each chat message must be an object with a 'role'")
        out.append({k: v for k, v in m.items() if v is not None or k == "content"})
    return out


def _make_params(defaults: Mapping[str, Any], row_params: Any) -> SamplingParams:
    """SamplingParams from the defaults with the row's own fields over them (None: not
    set). Any error is a ValueError naming the parameter."""
    from pagellm.sampling_params import SamplingParams

    merged = dict(defaults)
    if not _is_null(row_params):
        row_params = _to_python(row_params)
        if isinstance(row_params, str):
            try:
                row_params = json.loads(row_params)
            except json.JSONDecodeError as e:
                raise ValueError(f"sampling_params is not valid JSON: {e}") from None
        if not isinstance(row_params, dict):
            raise ValueError(
                f"sampling_params must be a dict (or its JSON text), got {type(row_params).__name__}"
            )
        for key, value in row_params.items():
            if value is None:
                continue
            if key == "logit_bias" and isinstance(value, dict):
                value = {k: v for k, v in value.items() if v is not None}
            merged[key] = value
    if "output_kind" in merged:
        raise ValueError("sampling_params must not set output_kind (the processor sets it)")
    try:
        params = SamplingParams(**merged)
    except TypeError as e:  # e.g. a field given a value of the wrong kind
        raise ValueError(f"sampling_params: {e}") from None
    if params.n != 1 or ((params.best_of or 1) > 1 and not params.use_beam_search):
        raise ValueError(
            "sampling_params: n and best_of must be 1 in batch inference "
            "(one row, one generation; repeat the row for more samples)"
        )
    return params


def _result(out: Any) -> Row:
    comp = out.outputs[0]
    return {
        "generated_text": comp.text,
        "generated_token_ids": list(comp.token_ids),
        "num_prompt_tokens": len(out.prompt_token_ids),
        "num_generated_tokens": len(comp.token_ids),
        "finish_reason": comp.finish_reason,
        "error": None,
    }


def _error_result(message: str) -> Row:
    return {
        "generated_text": None,
        "generated_token_ids": [],
        "num_prompt_tokens": 0,
        "num_generated_tokens": 0,
        "finish_reason": None,
        "error": message,
    }


def _is_null(value: Any) -> bool:
    if value is None:
        return True
    # NaN: how a missing value reads back from a column that went through pandas
    return isinstance(value, float) and value != value


def _to_python(value: Any) -> Any:
    """numpy arrays and scalars (what Ray's tensor columns read back as) as Python lists
    and numbers, so SamplingParams' type checks see plain ints and floats."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    return value


def _assigned_cpus() -> int | None:
    """Whole CPUs Ray assigned to this actor (at least 1); None outside a Ray worker."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # the driver, or a Ray without this call
        return None
    if not cpus:
        return None
    return max(1, int(cpus))
