"""Ray Serve (pagellm.integrations.ray_serve): the request router's choice without Ray,
then the Serve application on a local 2-CPU Ray with the real model, driven by the
official openai client through Serve's HTTP proxy, streamed and not."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from pagellm.integrations import ray_serve  # noqa: E402
from pagellm.sampling_params import SamplingParams  # noqa: E402

BS = 16
ENGINE: dict[str, Any] = {"max_model_len": 512, "kv_cache_memory": "64MiB"}


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def request(ids: list[int], session: str | None = None, rid: str = "r") -> ray_serve.EngineRequest:
    return ray_serve.EngineRequest(rid, {"prompt_token_ids": ids}, SamplingParams(),
                                   prompt_token_ids=ids, session=session)  # fmt: skip


def test_chooser_keeps_prefixes_together_and_spreads_the_rest() -> None:
    chooser = ray_serve.ReplicaChooser(BS)
    chooser.update(["a", "b", "c"])
    everyone = ["a", "b", "c"]
    system = tokens(1, 128)
    first = chooser.rank(everyone, request(system + tokens(2, 20)), "q0")[0]
    chooser.finished("q0")
    # Turn after turn, prompts sharing the system prompt go where it is cached.
    for i in range(4):
        assert chooser.rank(everyone, request(system + tokens(10 + i, 20)), f"q{i + 1}")[0] == first
        chooser.finished(f"q{i + 1}")
    assert chooser.inflight[first] == 0
    # Unrelated prompts in flight together spread over the replicas (load in tokens).
    spread = [chooser.rank(everyone, request(tokens(50 + i, 100)), f"u{i}")[0] for i in range(3)]
    assert sorted(spread) == everyone
    assert chooser.inflight == {r: 100 for r in everyone}
    for i in range(3):
        chooser.finished(f"u{i}")
    # What a replica reports counts too (all routers' requests): busier by more than
    # the prompt would save, the prefix's replica is passed over.
    chooser.update(everyone, {first: {"num_tokens": 5000, "num_blocks": 100}})
    assert chooser.load(first) == 5000
    assert chooser.router is not None
    assert chooser.router.indexes[chooser.index_of[first]].capacity == 100
    ranked = chooser.rank(everyone, request(system + tokens(3, 20)), "q9")
    assert ranked[0] != first and ranked[-1] == first


def test_chooser_follows_replicas_that_come_and_go() -> None:
    chooser = ray_serve.ReplicaChooser(BS)
    chooser.update(["a", "b"])
    prompt = tokens(7, 96)
    home = chooser.rank(["a", "b"], request(prompt, session="s1"), "x")[0]
    assert chooser.rank(["a", "b"], request(tokens(8, 96), session="s1"), "y")[0] == home
    # Autoscaling: the session's replica leaves, a new one joins with a fresh index.
    left = {"a", "b"} - {home}
    chooser.update([*left, "c"])
    assert chooser.router is not None
    assert chooser.router.num_engines == 3 and chooser.index_of["c"] == 2
    moved = chooser.rank([*left, "c"], request(prompt, session="s1"), "z")[0]
    assert moved in left | {"c"}
    assert chooser.rank([*left, "c"], request(tokens(9, 96), session="s1"), "w")[0] == moved
    # A candidate the chooser has not seen yet still gets ranked (last).
    assert chooser.rank(["d"], request(prompt), "v") == ["d"]


def _fake_replica(rid: str) -> Any:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid), routing_stats={})


def _pending(req: ray_serve.EngineRequest | None, rid: str) -> Any:
    args = [req] if req is not None else ["not an engine request"]
    return SimpleNamespace(args=args, kwargs={}, metadata=SimpleNamespace(internal_request_id=rid))


def test_request_router_ranks_replicas_for_serve() -> None:
    """PagellmRequestRouter.choose_replicas on fake replicas (no Serve): one replica per
    rank, the prefix's replica first; a call without an EngineRequest takes two at random."""
    router = object.__new__(ray_serve.PagellmRequestRouter)
    replicas = [_fake_replica(r) for r in ("a", "b", "c")]
    router._replicas = {r.replica_id.unique_id: r for r in replicas}
    router.initialize_state(block_size=BS)

    def choose(req: ray_serve.EngineRequest | None, rid: str) -> list[list[Any]]:
        return asyncio.run(router.choose_replicas(replicas, _pending(req, rid)))

    system = tokens(3, 160)
    ranks = choose(request(system + tokens(4, 10)), "1")
    assert [len(r) for r in ranks] == [1, 1, 1]
    home = ranks[0][0]
    router.on_request_completed(home.replica_id, "1")
    assert choose(request(system + tokens(5, 10)), "2")[0][0] is home
    assert router.chooser.inflight[home.replica_id.unique_id] == len(system) + 10
    (pair,) = choose(None, "3")
    assert len(pair) == 2 and len({id(r) for r in pair}) == 2


def test_bad_options_fail_at_build() -> None:
    with pytest.raises(ValueError, match="min_replicas"):
        ray_serve.build_app(ENGINE, min_replicas=2, max_replicas=1)
    with pytest.raises(ValueError, match="temprature"):
        ray_serve.build_app({"temprature": 0.5})
    with pytest.raises(ValueError, match="not a `pagellm serve` option"):
        ray_serve.build_app(ENGINE, server_kwargs={"api_kee": "x"})
    with pytest.raises(ValueError, match="allow_runtime_lora"):
        ray_serve.build_app(ENGINE, server_kwargs={"allow_runtime_lora": True})


# ---- the application on a local Ray ---------------------------------------------------------


@pytest.fixture(scope="module")
def serve_url() -> Iterator[str]:
    from pagellm.utils import get_open_port

    port = get_open_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = ray_serve.build_app(ENGINE, min_replicas=1, max_replicas=1, num_cpus_per_replica=1)
        serve.run(app, name="pagellm", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(serve_url: str) -> Any:
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="none", max_retries=0, timeout=120)


def test_chat_streamed_equals_not_streamed(client: Any) -> None:
    (model,) = [m.id for m in client.models.list().data]
    messages = [{"role": "user", "content": "Name three colours."}]
    full = client.chat.completions.create(
        model=model, messages=messages, temperature=0.0, max_tokens=16
    )
    text = full.choices[0].message.content
    assert text and full.usage.completion_tokens > 0
    assert full.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, temperature=0.0, max_tokens=16, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_and_errors(client: Any) -> None:
    out = client.completions.create(
        model="", prompt="The capital of France is", temperature=0.0, max_tokens=8
    )
    assert out.choices[0].text and out.usage.prompt_tokens > 0
    # Checked in the ingress before anything reaches an engine: OpenAI's 400 body.
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="", prompt="Hi", temperature=-1.0, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Hi", max_tokens=4)


def test_closed_stream_aborts_its_request(client: Any) -> None:
    """A client that leaves mid-stream: Serve cancels the call and the replica aborts
    the request in its engine (counted by the replica; nothing left running)."""
    import time

    engine = serve.get_deployment_handle(ray_serve.ENGINE_DEPLOYMENT, app_name="pagellm")
    before = engine.stats.remote().result()
    stream = client.completions.create(
        model="", prompt="Write a long story about a dragon:", max_tokens=400,
        temperature=0.0, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].text)
        if received == 3:
            break
    stream.close()
    deadline = time.monotonic() + 60
    while True:
        after = engine.stats.remote().result()
        if after["num_aborted"] > before["num_aborted"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after["num_aborted"] == before["num_aborted"] + 1, after
    assert after["num_finished"] == before["num_finished"], after
    assert after["num_unfinished"] == 0, after
