"""The web page in a real browser (Playwright driving Chromium) against a real server
with the real model, an API key and a LoRA adapter: the page asks for the key and the
API refuses without it, a chat streams into the page, the model picker switches to the
adapter, JSON-schema mode, bad input, history across a reload, the dashboard's charts
moving after requests, and a `pagellm bench serve` sweep rendered by `pagellm bench
report`. A screenshot of each view goes to test-artifacts/ui/ (PAGELLM_TEST_ARTIFACTS)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.utils import RemoteServer, random_adapter

KEY = "sk-ui-test"
BASE = "SmolLM2-135M-Instruct"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("PAGELLM_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "ui"


def chromium_path() -> str | None:
    """The system's Chromium (Debian's package; `make setup` installs it), else None:
    Playwright's own download, if `playwright install chromium` fetched one."""
    for name in (os.environ.get("PAGELLM_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):  # fmt: skip
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("ui")
    args = ["--api-key", KEY, "--max-model-len", "512", "--kv-cache-memory", "64MiB",
            "--max-lora-rank", "8", "--lora-modules", f"big={random_adapter(root / 'big')}"]  # fmt: skip
    with RemoteServer(args) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser: Any, server: Any) -> Iterator[Any]:
    """One browser tab for the tests in order (the key and history live in its storage)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors
    yield pg
    context.close()
    assert not errors, errors  # no uncaught JavaScript error on any page


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000


def authed(server: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_files_are_open_and_the_api_is_not(server: Any) -> None:
    r = httpx.get(server.url("/"), follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    page = httpx.get(server.url("/ui/"))
    assert page.status_code == 200 and "pagellm playground" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    for name in ("dashboard.html", "playground.js", "dashboard.js", "charts.js", "markdown.js",
                 "common.js", "style.css"):  # fmt: skip
        r = httpx.get(server.url(f"/ui/{name}"))
        assert r.status_code == 200 and r.content, name
        assert "cdn" not in r.text.lower(), name
    assert httpx.get(server.url("/ui/%2E%2E/%2E%2E/pyproject.toml")).status_code == 404
    assert (
        httpx.get(server.url("/ui/../pyproject.toml")).status_code == 401
    )  # that is /pyproject.toml
    assert httpx.get(server.url("/ui/missing.js")).status_code == 404
    assert httpx.get(server.url("/v1/models")).status_code == 401
    assert httpx.get(server.url("/server_info")).status_code == 401
    info = httpx.get(server.url("/server_info"), headers=authed(server)).json()
    assert info["api_key_required"] is True
    assert info["engine_config"]["model"]["served_model_name"] == BASE
    assert info["engine_config"]["model"]["hf_config"]["num_hidden_layers"] == 30
    plan = info["memory_plan"]
    assert plan["num_blocks"] * plan["block_size"] == plan["num_tokens"] > 0
    assert plan["weight_bytes"] > 50e6 and plan["kv_bytes"] <= 64 * 2**20
    assert [m["id"] for m in info["models"]] == [BASE, "big"]
    assert KEY not in json.dumps(info)


def _wait_done(page: Any, count: int) -> Any:
    """The count-th assistant message once its stream ended."""
    page.wait_for_function(
        f"document.querySelectorAll('.msg.assistant').length >= {count} && "
        f"document.querySelectorAll('.msg.assistant')[{count - 1}].dataset.done === '1'",
        timeout=120_000,
    )
    return page.locator(".msg.assistant").nth(count - 1)


def _send(page: Any, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def test_the_page_asks_for_the_key_and_streams_a_chat(page: Any, server: Any) -> None:
    page.goto(server.url("/"))
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    shot(page, "key-dialog")
    page.fill("#key-input", "sk-wrong")
    page.click("#key-save")
    # The API refused the wrong key: the dialog asks again, with the server's reason.
    page.wait_for_function(
        "document.querySelector('#key-dialog').open && "
        "document.querySelector('#key-message').textContent.includes('another key')"
    )
    assert "Incorrect or missing API key" in page.inner_text("#key-message")
    page.fill("#key-input", KEY)
    page.click("#key-save")
    page.wait_for_function("document.body.dataset.ready === '1'")
    options = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert options == [BASE, "big"]
    assert "base model" in page.inner_text("#model-info")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    page.fill("#system", "You are a terse assistant.")
    # Record every length the answer's text goes through: streaming shows several.
    page.evaluate(
        """() => {
        window.lens = [];
        new MutationObserver(() => {
          const c = document.querySelectorAll('.msg.assistant .content');
          if (c.length) window.lens.push(c[c.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true,
                                                         characterData: true});
      }"""
    )
    _send(page, "Write a short poem about the sea.")
    answer = _wait_done(page, 1)
    text = answer.locator(".content").inner_text()
    assert text.strip()
    lens = page.evaluate("window.lens")
    partial = sorted({n for n in lens if 0 < n < len(text)})
    assert len(partial) >= 3, lens  # the text grew in steps while it streamed
    stats = answer.locator(".stats").inner_text()
    assert "40 completion tokens" in stats and "tok/s" in stats and "TTFT" in stats, stats
    assert BASE in stats and "finish: length" in stats
    # The same request through the API gives the same greedy text.
    body = {"model": BASE, "max_tokens": 40, "temperature": 0,
            "messages": [{"role": "system", "content": "You are a terse assistant."},
                         {"role": "user", "content": "Write a short poem about the sea."}]}  # fmt: skip
    r = httpx.post(
        server.url("/v1/chat/completions"), json=body, headers=authed(server), timeout=120
    )
    expected = r.json()["choices"][0]["message"]["content"]
    stored = page.evaluate("JSON.parse(localStorage.getItem('pagellm.conversations'))")
    assert stored[0]["messages"][1]["content"] == expected
    assert stored[0]["title"].startswith("Write a short poem")
    shot(page, "playground")


def test_switching_to_the_adapter_and_history_survives_a_reload(page: Any, server: Any) -> None:
    page.select_option("#model", "big")
    assert "LoRA adapter on " + BASE in page.inner_text("#model-info")
    _send(page, "Write a short poem about the sea.")
    answer = _wait_done(page, 2)
    assert "big ·" in answer.locator(".stats").inner_text()
    stored = page.evaluate("JSON.parse(localStorage.getItem('pagellm.conversations'))")
    base_text, big_text = stored[0]["messages"][1]["content"], stored[0]["messages"][3]["content"]
    assert big_text and big_text != base_text  # the adapter answered, not the base model
    shot(page, "playground-adapter")
    page.reload()
    page.wait_for_function("document.body.dataset.ready === '1'")
    assert page.locator(".msg").count() == 4  # two questions, two answers
    assert page.input_value("#model") == "big"  # the conversation's model
    assert page.input_value("#temperature") == "0"  # the settings too
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    assert page.locator("#conversations li").count() == 2


def test_json_schema_mode_and_bad_input(page: Any, server: Any) -> None:
    page.select_option("#model", BASE)
    page.fill("#max_tokens", "60")
    page.select_option("#format", "json_schema")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}  # fmt: skip
    page.fill("#schema", json.dumps(schema))
    _send(page, "Give me a number as JSON.")
    answer = _wait_done(page, 1)
    stored = page.evaluate("JSON.parse(localStorage.getItem('pagellm.conversations'))")
    value = json.loads(stored[0]["messages"][1]["content"])
    assert isinstance(value["n"], int) and set(value) == {"n"}
    assert answer.locator("pre, p").count() >= 1
    page.select_option("#format", "text")
    # Tools that are not JSON: the page says so and sends nothing.
    page.fill("#tools", "[{not json")
    _send(page, "hello")
    assert "not valid JSON" in page.inner_text("#settings-error")
    assert page.locator(".msg").count() == 2
    page.fill("#tools", "")
    # A request the server refuses: its error shows in the conversation.
    page.fill("#max_tokens", "100000")
    _send(page, "hello")
    err = _wait_done(page, 2)
    assert "max_model_len" in err.inner_text() or "maximum context" in err.inner_text()
    assert "error-msg" in (err.get_attribute("class") or "")
    page.fill("#max_tokens", "40")
    shot(page, "playground-errors")


def _cards(page: Any) -> dict[str, str]:
    return page.evaluate(
        "Object.fromEntries([...document.querySelectorAll('.card')].map("
        "c => [c.id.slice(5), c.querySelector('.value').textContent]))"
    )


def test_dashboard_charts_follow_the_requests(page: Any, server: Any) -> None:
    page.goto(server.url("/ui/dashboard.html?interval=300&window=60"))
    page.wait_for_function("Number(document.body.dataset.polls || 0) >= 2")
    page.wait_for_selector("#table-memory")
    assert "weights" in page.inner_text("#table-memory")
    assert "model.dtype" in page.inner_text("#table-config")
    before = int(_cards(page)["requests"])
    body = {"model": BASE, "prompt": "The capital of France is", "max_tokens": 16,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    for _ in range(3):
        r = httpx.post(
            server.url("/v1/completions"), json=body, headers=authed(server), timeout=120
        )
        assert r.status_code == 200
    page.wait_for_function(
        f"Number(document.getElementById('card-requests').querySelector('.value').textContent) >= {before + 3}",
        timeout=30_000,
    )
    points = int(page.get_attribute("#chart-tokens canvas", "data-points") or 0)
    assert points >= 3
    # The percentiles over the window have values now, and tokens/s saw the generation.
    ttft = json.loads(page.get_attribute("#chart-ttft canvas", "data-last") or "{}")
    assert ttft["p50"] is not None and ttft["p99"] >= ttft["p50"] > 0
    tpot = json.loads(page.get_attribute("#chart-tpot canvas", "data-last") or "{}")
    assert tpot["p50"] is not None and tpot["p50"] > 0
    peaks = json.loads(page.get_attribute("#chart-tokens canvas", "data-max") or "{}")
    assert peaks["generation"] > 0 and peaks["prompt"] > 0
    assert int(_cards(page)["generated"]) >= 3 * 16
    kv = json.loads(page.get_attribute("#chart-kv canvas", "data-last") or "{}")
    assert 0 <= kv["used"] <= 100
    shot(page, "dashboard")


def test_bench_report_renders_a_sweep(page: Any, server: Any, tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    cli = [sys.executable, "-m", "pagellm.entrypoints.cli", "--log-level", "WARNING", "bench"]
    proc = subprocess.run(
        [*cli, "serve", "--base-url", server.url(), "--api-key", KEY, "--num-prompts", "4",
         "--input-len", "16", "--output-len", "8", "--max-concurrency", "1,4", "--ignore-eos",
         "--output-json", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    html_path = ARTIFACTS / "report.html"
    proc = subprocess.run(
        [*cli, "report", str(out), "-o", str(html_path), "--labels", "pagellm"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = html_path.read_text()
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org", "")
    page.goto(html_path.as_uri())
    assert page.locator("svg").count() == 6  # throughput, requests/s, TTFT, TPOT, ITL, E2E
    names = page.eval_on_selector_all("polyline.series", "ps => ps.map(p => p.dataset.name)")
    assert "pagellm output tok/s" in names and "pagellm p99" in names
    rows = page.locator("table").first.locator("tbody tr")
    assert rows.count() == 2
    shot(page, "report")


def _metrics_text(step: int) -> str:
    """/metrics of two replicas, a model with two KV cache groups and two API keys, as
    the exporter writes it (the real PrometheusStatLogger; the key lines in the policy's
    format), after ``step`` rounds of traffic."""
    from pagellm.metrics.prometheus import PrometheusStatLogger
    from pagellm.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats

    prom = PrometheusStatLogger("m", 0, 2)
    for _ in range(step):
        for e in (0, 1):
            done = FinishedRequestStats("length", 1.0, 0.01, 0.1, 0.8, 20, 10 * (e + 1))
            it = IterationStats(20, num_generation_tokens=10 * (e + 1),
                                time_to_first_tokens=[0.05 * (e + 1)], finished=[done])  # fmt: skip
            prom.record(it, None, e)
    for e in (0, 1):
        sched = SchedulerStats(num_running=1 + e, num_waiting=e, kv_cache_usage=0.3,
                               kv_cache_group_usage=(0.2, 0.1), prefix_cache_queries=100 * step,
                               prefix_cache_hits=40 * step)  # fmt: skip
        prom.record(None, sched, e)
    keys = "".join(
        f'pagellm:key_usage_total{{key="{k}",kind="requests"}} {n * step}\n'
        f'pagellm:key_inflight{{key="{k}"}} {n}\n'
        for k, n in (("team-a", 1), ("team-b", 3))
    )
    return prom.render().decode() + keys


def test_dashboard_splits_replicas_groups_and_keys(page: Any, server: Any) -> None:
    calls = {"n": 0}

    def metrics(route: Any) -> None:
        calls["n"] += 1
        route.fulfill(status=200, content_type="text/plain", body=_metrics_text(calls["n"]))

    page.route("**/metrics", metrics)
    try:
        page.goto(server.url("/ui/dashboard.html?interval=250"))
        page.wait_for_function("Number(document.body.dataset.polls || 0) >= 4")
    finally:
        page.unroute("**/metrics")
    cards = _cards(page)
    assert cards["replicas"] == "2 / 2" and cards["running"] == "3" and cards["waiting"] == "1"
    assert cards["prefix"] == "40.0 %"
    reqs = json.loads(page.get_attribute("#chart-requests canvas", "data-last") or "{}")
    assert reqs["running e0"] == 1 and reqs["running e1"] == 2 and reqs["waiting"] == 1
    kv = json.loads(page.get_attribute("#chart-kv canvas", "data-last") or "{}")
    assert kv == {"e0 group 0": 20, "e0 group 1": 10, "e1 group 0": 20, "e1 group 1": 10}
    tokens = json.loads(page.get_attribute("#chart-tokens canvas", "data-max") or "{}")
    assert tokens["gen e1"] > tokens["gen e0"] > 0  # replica 1 generates twice as much
    keys = json.loads(page.get_attribute("#chart-keys canvas", "data-max") or "{}")
    assert keys["team-b"] > keys["team-a"] > 0
    inflight = json.loads(page.get_attribute("#chart-inflight canvas", "data-last") or "{}")
    assert inflight == {"team-a": 1, "team-b": 3}
    ttft = json.loads(page.get_attribute("#chart-ttft canvas", "data-last") or "{}")
    assert 40 <= ttft["p50"] <= 100  # observations of 50 and 100 ms
    shot(page, "dashboard-replicas")


def test_markdown_renders_and_escapes(page: Any, server: Any) -> None:
    """What an answer's Markdown becomes: code blocks, lists, tables, inline marks; and
    a model's HTML or script never becomes markup."""
    page.goto(server.url("/ui/"))
    page.wait_for_function("typeof Markdown === 'object'")
    text = (
        "# Title\n\nSome **bold**, *italic* and `<b>code</b>`.\n\n"
        "```python\nprint('<script>')\n```\n\n- one\n- two\n\n1. first\n2. second\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n> quoted\n\n"
        "<img src=x onerror=alert(1)> [safe](https://example.org) [bad](javascript:alert(1))\n\n"
        "```\nunclosed fence"
    )
    html = page.evaluate("t => Markdown.render(t)", text)
    page.evaluate(
        "h => { const d = document.createElement('div'); d.id = 'md-probe'; d.className = 'md';"
        " d.innerHTML = h; document.body.append(d); }",
        html,
    )
    probe = page.locator("#md-probe")
    assert probe.locator("h1").inner_text() == "Title"
    assert probe.locator("strong").inner_text() == "bold"
    assert probe.locator("em").inner_text() == "italic"
    assert probe.locator("p code").first.inner_text() == "<b>code</b>"
    assert probe.locator("pre code.language-python").inner_text() == "print('<script>')"
    assert probe.locator("pre .lang").first.inner_text() == "python"
    assert probe.locator("ul li").count() == 2 and probe.locator("ol li").count() == 2
    assert probe.locator("table td").all_inner_texts() == ["1", "2"]
    assert probe.locator("blockquote").inner_text().strip() == "quoted"
    assert probe.locator("img, script").count() == 0  # no markup from the text
    assert "<img src=x" in probe.inner_text()  # shown as text instead
    hrefs = probe.locator("a").evaluate_all("as => as.map(a => a.getAttribute('href'))")
    assert hrefs == ["https://example.org"]  # the javascript: link stays text
    assert probe.locator("pre code").last.inner_text() == "unclosed fence"


def test_every_static_file_ships_in_the_wheel() -> None:
    """pyproject's package-data covers each file the page serves."""
    import fnmatch

    import tomllib

    from pagellm.ui import STATIC_DIR

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["pagellm"]
    files = [f"ui/static/{name}" for name in os.listdir(STATIC_DIR)]
    assert len(files) >= 8
    for f in files:
        assert any(fnmatch.fnmatch(f, p) for p in patterns), f
