"""``pagellm run-batch``: an OpenAI Batch-API input file, processed on this machine.

Each input line is ``{"custom_id", "method": "POST", "url", "body"}``, with url one of
/v1/chat/completions, /v1/completions or /v1/embeddings. The body goes through the
server's own request models and serving classes, so a line is answered exactly as
``pagellm serve`` would answer the same body (the same response JSON, the same error
status and message).

Contract: every non-blank input line gets exactly one output line, in input order,
whatever happens to the others (a line that fails becomes an error line, never a stop).
Blank lines (only whitespace) are skipped. An output path is written atomically: the
lines go to a temporary file beside it, renamed over it once every line is written.

Output line (OpenAI's batch output format)::

    {"id": "batch_req_<hex>", "custom_id": ..., "error": null,
     "response": {"status_code": 200, "request_id": "req_<hex>", "body": <response>}}

A failed line has ``response.status_code`` the HTTP status the server would answer
(400, 404, 405, 500, 503), ``response.body`` the OpenAI error body the server would send
(``{"error": {"message", "type", "param", "code"}}``) and ``error`` set to
``{"code", "message"}`` as well (OpenAI fills ``error`` only for lines that never reached
the model and reports HTTP errors in ``response`` alone; filling both lets a reader test
either). ``error.code`` is the error body's ``code``, or its ``type`` when it has none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any

from pydantic import BaseModel, ValidationError

from pagellm.engine.arg_utils import EngineArgs
from pagellm.engine.async_llm import AsyncLLM, EngineDeadError, QueueFullError
from pagellm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from pagellm.entrypoints.openai.reasoning import REASONING_PARSERS
from pagellm.entrypoints.openai.serving_base import APIError, error_of, validation_error
from pagellm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagellm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagellm.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from pagellm.entrypoints.openai.serving_models import ServingModels, parse_lora_modules
from pagellm.utils import random_uuid

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONCURRENCY = 64


@dataclass(frozen=True)
class Endpoint:
    """One batch url: its request model and the serving call that answers it."""

    request_model: type[BaseModel]
    create: Callable[[Any], Awaitable[Any]]


def error_line(err: APIError, custom_id: Any, request_id: str | None = None) -> dict[str, Any]:
    """The output line of a failed input line."""
    return {
        "id": f"batch_req_{random_uuid()}",
        "custom_id": custom_id,
        "response": {
            "status_code": err.status,
            "request_id": request_id or f"req_{random_uuid()}",
            "body": err.body(),
        },
        "error": {"code": err.code or err.type, "message": err.message},
    }


class BatchRunner:
    """Answers input lines with the server's serving classes over one engine.

    ``run_line`` never raises (an exception becomes an error line), except for
    cancellation; ``seen_ids`` is checked and updated in input order by ``parse``, before
    any line runs, so a duplicate is always the later line."""

    def __init__(self, engine: AsyncLLM, args: argparse.Namespace) -> None:
        served = ServingModels(engine, [engine.config.model.served_model_name])
        for name, path in parse_lora_modules(getattr(args, "lora_modules", None)):
            served.load(name, path)  # a bad adapter stops start-up (ValueError)
        chat = OpenAIServingChat(
            engine, served, args.tool_call_parser, getattr(args, "reasoning_parser", None)
        )
        completion = OpenAIServingCompletion(engine, served)
        embedding = OpenAIServingEmbedding(engine, served)
        self.endpoints: dict[str, Endpoint] = {
            "/v1/chat/completions": Endpoint(ChatCompletionRequest, chat.create),
            "/v1/completions": Endpoint(CompletionRequest, completion.create),
            "/v1/embeddings": Endpoint(EmbeddingRequest, embedding.create),
        }
        self.seen_ids: set[str] = set()

    def parse(self, lineno: int, raw: bytes) -> tuple[Any, Endpoint, Any] | dict[str, Any]:
        """(custom_id, endpoint, body) of a well-formed line, or its error line."""
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            return error_line(APIError.bad_request(f"Line {lineno} is not UTF-8: {e}"), None)
        except ValueError as e:
            return error_line(APIError.bad_request(f"Invalid JSON on line {lineno}: {e}"), None)
        if not isinstance(obj, dict):
            return error_line(APIError.bad_request(f"Line {lineno} is not a JSON object"), None)
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            message = f"Line {lineno}: custom_id must be a non-empty string"
            return error_line(APIError.bad_request(message, "custom_id"), custom_id)
        if custom_id in self.seen_ids:
            message = f"Line {lineno}: duplicate custom_id {custom_id!r} (ids must be unique)"
            return error_line(APIError.bad_request(message, "custom_id"), custom_id)
        self.seen_ids.add(custom_id)
        url = obj.get("url")
        endpoint = self.endpoints.get(url) if isinstance(url, str) else None
        if endpoint is None:
            message = f"Unsupported url {url!r}: expected one of {', '.join(self.endpoints)}"
            return error_line(APIError(404, message, "not_found_error", "url"), custom_id)
        if obj.get("method", "POST") != "POST":
            message = f"Method {obj.get('method')!r} is not allowed on {url}: only POST"
            return error_line(APIError(405, message, "invalid_request_error", "method"), custom_id)
        body = obj.get("body")
        if not isinstance(body, dict):
            message = "Missing required parameter: body (a JSON object)"
            return error_line(APIError.bad_request(message, "body"), custom_id)
        return custom_id, endpoint, body

    async def run_line(
        self, custom_id: Any, endpoint: Endpoint, body: dict[str, Any]
    ) -> dict[str, Any]:
        request_id = f"req_{random_uuid()}"
        try:
            req = endpoint.request_model.model_validate(body)
        except ValidationError as e:
            return error_line(validation_error(e.errors()), custom_id, request_id)
        if getattr(req, "stream", False):
            err = APIError.bad_request("stream is not supported in a batch", "stream")
            return error_line(err, custom_id, request_id)
        try:
            result = await endpoint.create(req)
        except (APIError, ValueError, EngineDeadError, QueueFullError) as e:
            return error_line(error_of(e), custom_id, request_id)
        except Exception:
            logger.exception("unhandled error on batch line %r", custom_id)
            err = APIError(500, "Internal server error.", "server_error")
            return error_line(err, custom_id, request_id)
        payload = result if isinstance(result, dict) else result.model_dump(mode="json")
        return {
            "id": f"batch_req_{random_uuid()}",
            "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": payload},
            "error": None,
        }


def read_input(path: str) -> list[tuple[int, bytes]]:
    """The non-blank lines of the input (1-based line numbers); OSError if unreadable.
    Read whole before the model loads, so that a bad path fails in a second."""
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        if path.startswith(("http://", "https://")):
            raise OSError("http(s) URLs are not supported as input: download the file first")
        with open(path, "rb") as f:
            data = f.read()
    return [(i, line) for i, line in enumerate(data.split(b"\n"), 1) if line.strip()]


class Output:
    """The output stream: stdout, or a temporary file beside the path that ``commit``
    renames over it (``discard`` removes it: an interrupted run leaves the old file)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tmp: str | None = None
        if path == "-":
            self.file: IO[str] = sys.stdout
            return
        target = os.path.abspath(path)
        fd, self.tmp = tempfile.mkstemp(
            dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.", suffix=".tmp"
        )
        self.file = os.fdopen(fd, "w", encoding="utf-8")
        # mkstemp makes the file 0600; the output gets the mode a plain open() would give.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)

    def write(self, line: dict[str, Any]) -> None:
        self.file.write(json.dumps(line, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        self.file.flush()
        if self.tmp is None:
            return
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        self.tmp = None

    def discard(self) -> None:
        if self.tmp is not None:
            self.file.close()
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None


async def process(
    runner: BatchRunner,
    lines: list[tuple[int, bytes]],
    out: Output,
    max_concurrency: int,
    progress: bool,
) -> tuple[int, int]:
    """Run the lines with at most ``max_concurrency`` in flight and write their results in
    input order as soon as every earlier one is written; (ok, failed)."""
    from tqdm import tqdm

    sem = asyncio.Semaphore(max_concurrency)
    pending: asyncio.Queue[asyncio.Task[dict[str, Any]] | None] = asyncio.Queue()
    counts = [0, 0]

    async def one(custom_id: Any, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await runner.run_line(custom_id, endpoint, body)
        finally:
            sem.release()

    async def done(line: dict[str, Any]) -> dict[str, Any]:
        return line

    async def writer() -> None:
        with tqdm(total=len(lines), disable=not progress, unit="req", file=sys.stderr) as bar:
            while (task := await pending.get()) is not None:
                line = await task
                out.write(line)
                counts[line["error"] is not None] += 1
                bar.update(1)

    write_task = asyncio.create_task(writer())
    tasks: list[asyncio.Task[Any]] = [write_task]
    try:
        for lineno, raw in lines:
            parsed = runner.parse(lineno, raw)
            if isinstance(parsed, dict):
                task = asyncio.create_task(done(parsed))
            else:
                await sem.acquire()
                task = asyncio.create_task(one(*parsed))
            tasks.append(task)
            await pending.put(task)
            if write_task.done():  # the writer failed (a full disk): stop feeding it
                break
        await pending.put(None)
        await write_task
    finally:
        for t in tasks:
            t.cancel()  # only unfinished ones, after an error: aborts their requests
        await asyncio.gather(*tasks, return_exceptions=True)
    return counts[0], counts[1]


async def run_batch(args: argparse.Namespace) -> int:
    if args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    try:
        lines = read_input(args.input)
    except OSError as e:
        print(f"pagellm run-batch: error: cannot read {args.input}: {e}", file=sys.stderr)
        return 2
    try:
        out = Output(args.output)
    except OSError as e:
        print(f"pagellm run-batch: error: cannot write {args.output}: {e}", file=sys.stderr)
        return 2
    started = time.monotonic()
    engine: AsyncLLM | None = None
    try:
        # -dp N: N replicas, lines routed as the server routes requests.
        engine = AsyncLLM.from_engine_args(EngineArgs.from_cli_args(args))
        engine.start()
        runner = BatchRunner(engine, args)
        ready = time.monotonic()
        ok, failed = await process(
            runner, lines, out, args.max_concurrency, progress=args.output != "-"
        )
        dead = engine.errored
        out.commit()
    finally:
        out.discard()
        if engine is not None:
            engine.shutdown()
    end = time.monotonic()
    where = "" if args.output == "-" else f" -> {args.output}"
    print(
        f"pagellm run-batch: {len(lines)} lines, {ok} ok, {failed} failed in {end - ready:.1f} s "
        f"({end - started:.1f} s with start-up){where}",
        file=sys.stderr,
    )
    if dead:
        logger.error("the engine stopped after an error: the lines after it failed with 503")
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(run_batch(args))


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run-batch",
        help="process an OpenAI Batch-API JSONL file (vLLM's run-batch)",
        description="Answer every line of an OpenAI Batch-API input file (chat completions, "
        "completions, embeddings) as `pagellm serve` would, and write one output line per "
        "input line, in input order. Exit status 0 once the file is processed (error lines "
        "included), 2 if the input cannot be read, 1 if the engine died.",
    )
    p.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                   help="model directory, .gguf file or hub id (default: SmolLM2-135M-Instruct)")  # fmt: skip
    p.add_argument("-i", "--input", required=True,
                   help="input JSONL path, or - for stdin (http(s) URLs are not supported: "
                   "download the file first)")  # fmt: skip
    p.add_argument("-o", "--output", required=True,
                   help="output JSONL path (written atomically), or - for stdout")  # fmt: skip
    p.add_argument("--max-concurrency", type=int, default=DEFAULT_MAX_CONCURRENCY,
                   help="most lines in flight at once")  # fmt: skip
    p.add_argument("--tool-call-parser", default="hermes", choices=("hermes", "llama3_json"),
                   help="how tool calls are found in replies (tool_choice auto)")  # fmt: skip
    p.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="split a reasoning model's <think>...</think> from its answer")  # fmt: skip
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA adapters a line's model may name: name=path or "
                   "'{\"name\": ..., \"path\": ...}' (implies --enable-lora)")  # fmt: skip
    EngineArgs.add_cli_args(p)
    p.set_defaults(handler=run)
