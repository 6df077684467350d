"""Ray Data batch inference (pagellm.integrations.ray_data) on a local 2-CPU Ray with the
real model: the generations equal LLM.generate / LLM.chat run in this process, and a bad
row gets an error column instead of failing the job."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("pandas")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from pagellm.integrations import ray_data  # noqa: E402

# Ray Data's own context warns about its deprecated fields when it is copied to workers.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")

# The actor gets 1 of Ray's 2 CPUs, so its engine runs 1 thread; the reference runs 1
# thread too, and both see the same engine options.
ENGINE: dict[str, Any] = {"max_model_len": 512, "kv_cache_memory": "64MiB"}
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 8}
NUM_TEXT = 24  # rows 0..23: prompt text; rows 24..31: chat messages


def _rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i in range(32):
        if i < NUM_TEXT:
            rows.append({"id": i, "prompt": f"Here is a short story about a cat named Tom {i}:",
                         "messages": None})  # fmt: skip
        else:
            chat = [{"role": "user", "content": f"Name a colour and the number {i}."}]
            rows.append({"id": i, "prompt": None, "messages": chat})
    return rows


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    """Greedy token ids from LLM.generate / LLM.chat in this process (built and freed
    before Ray starts, so that it does not compete with the actor for the 2 cores)."""
    from pagellm import LLM, SamplingParams

    llm = LLM(**ENGINE, num_threads=1)
    sp = SamplingParams(**GREEDY)
    rows = _rows()
    texts = llm.generate([r["prompt"] for r in rows[:NUM_TEXT]], sp, use_tqdm=False)
    chats = llm.chat([r["messages"] for r in rows[NUM_TEXT:]], sp, use_tqdm=False)
    ids = [list(o.outputs[0].token_ids) for o in texts + chats]
    del llm
    return ids


@pytest.fixture(scope="module")
def local_ray(reference: list[list[int]]) -> Iterator[Any]:
    # Workers start with this interpreter (the venv, where pagellm is installed editable).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})  # fmt: skip
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


def _processor(**kwargs: Any) -> ray_data.PagellmProcessor:
    return ray_data.build_processor(
        ENGINE, GREEDY, concurrency=1, batch_size=16, num_cpus_per_actor=1, **kwargs
    )


BAD_ROWS: list[dict[str, Any]] = [
    {"prompt": "The capital of France is", "sampling_params": None},
    {"prompt": "The capital of Italy is", "sampling_params": {"temperature": -1.0}},
    {"prompt": "The capital of Spain is", "sampling_params": {"max_tokens": 2}},
    {"prompt": None, "sampling_params": None},  # no prompt at all
    {"prompt": "The capital of Peru is", "sampling_params": '{"temprature": 0.5}'},
    {"prompt": "The capital of Chile is", "sampling_params": None},
]


def test_generations_equal_llm_generate_and_bad_rows_get_an_error(
    local_ray: Any, reference: list[list[int]]
) -> None:
    """One job (one actor, one engine start): 32 good rows equal to LLM.generate /
    LLM.chat, then rows with bad sampling parameters or no prompt, which get an error
    column while the rest of their batch is served."""
    good = [{**r, "sampling_params": None} for r in _rows()]
    bad = [{"id": 32 + i, "messages": None, **r} for i, r in enumerate(BAD_ROWS)]

    def post(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "ok": row["error"] is None}

    proc = _processor(preprocess=lambda row: {"tag": f"row{row['id']}"}, postprocess=post)
    ds = local_ray.data.from_items(good + bad)
    out = sorted(proc(ds).take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in out] == list(range(38))
    for r, ref in zip(out[:32], reference):
        assert r["error"] is None and r["ok"], r
        assert list(r["generated_token_ids"]) == ref, r["id"]
        assert r["num_generated_tokens"] == len(ref)
        assert r["num_prompt_tokens"] > 0
        assert r["finish_reason"] in ("stop", "length")
        assert isinstance(r["generated_text"], str)
        assert r["tag"] == f"row{r['id']}"  # preprocess output merged over the row
    # Real generations, not all an immediate EOS; input columns are kept.
    assert sum(r["finish_reason"] == "length" for r in out[:32]) >= 16
    assert out[0]["prompt"].endswith("Tom 0:") and out[30]["messages"][0]["role"] == "user"
    errors = {r["id"] - 32: r["error"] for r in out[32:]}
    assert "temperature must be non-negative" in errors[1]
    assert "none of the columns" in errors[3]
    assert "temprature" in errors[4]
    for i in (0, 2, 5):
        r = out[32 + i]
        assert errors[i] is None and r["ok"], r
        assert r["num_generated_tokens"] >= 1 and r["generated_text"] is not None
    assert out[34]["num_generated_tokens"] <= 2  # its own max_tokens over the default 8
    for i in (1, 3, 4):
        r = out[32 + i]
        assert not r["ok"] and list(r["generated_token_ids"]) == []
        assert r["generated_text"] is None


def test_config_checks_and_no_ray_on_import() -> None:
    with pytest.raises(ValueError, match="temperature"):
        ray_data.build_processor({}, {"temperature": -1})
    with pytest.raises(ValueError, match="concurrency"):
        ray_data.build_processor({}, concurrency=(3, 2))
    from pagellm import SamplingParams

    assert ray_data.sampling_dict(SamplingParams(max_tokens=4, temperature=0)) == {
        "max_tokens": 4,
        "temperature": 0.0,
    }
    # The integration stays optional: importing pagellm imports no Ray.
    import subprocess

    code = "import sys, pagellm, pagellm.integrations; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
