"""The policy's pieces on their own: the file's schema and errors, the streaming filter
across arbitrary chunk boundaries, the dead-loop detector and the per-key limiter."""

from __future__ import annotations

import random
from typing import Any

import pytest

from pagellm.entrypoints.openai.serving_base import APIError
from pagellm.policy.config import KeyLimits, PolicyError, RepetitionConfig, load_policy, luhn_ok
from pagellm.policy.guard import RepetitionDetector, StreamFilter, apply_rules
from pagellm.policy.limits import KeyState

POLICY = """\
guardrails:
  hold_back_chars: 48
  rules:
    - name: no-banana
      words: [banana]
      action: block
      stage: output
    - name: codename
      regex: "project\\\\s+x"
      action: redact
      replacement: "[CODENAME]"
  pii:
    types: [email, phone, card, ip]
"""

SECRETS = ["alice.smith@example.com", "4111 1111 1111 1111", "192.168.10.42", "+1 415-555-0132"]


def _policy(tmp_path: Any, text: str = POLICY) -> Any:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return load_policy(str(path))


def _stream(rules: Any, hold: int, text: str, rng: random.Random) -> list[str]:
    f = StreamFilter(rules, hold)
    chunks, i = [], 0
    while i < len(text):
        n = rng.randint(1, 4)
        chunks.append(f.feed(text[i : i + n]).text)
        i += n
    chunks.append(f.feed("", final=True).text)
    return chunks


def test_pii_split_anywhere_never_leaves_in_a_chunk(tmp_path: Any) -> None:
    config = _policy(tmp_path)
    rules = config.rules_for("output")
    text = ("Write to alice.smith@example.com or call +1 415-555-0132; card 4111 1111 1111 1111 "
            "from 192.168.10.42 about project  X today.")  # fmt: skip
    whole = apply_rules(rules, text).text
    assert whole == (
        "Write to [EMAIL] or call [PHONE]; card [CARD] from [IP] about [CODENAME] today."
    )
    for seed in range(30):
        chunks = _stream(rules, config.hold_back_chars, text, random.Random(seed))
        assert "".join(chunks) == whole
        for chunk in chunks:  # not even a fragment of a secret in any one chunk
            for secret in SECRETS:
                pieces = {secret[i : i + 5] for i in range(len(secret) - 4)}
                assert not any(p in chunk for p in pieces), (seed, chunk)


def test_block_stops_the_stream_and_keeps_what_came_before(tmp_path: Any) -> None:
    rules = _policy(tmp_path).rules_for("output")
    f = StreamFilter(rules, 48)
    sent = [f.feed(piece).text for piece in ["I like ", "ban", "ana", "s and ", "more"]]
    last = f.feed("", final=True)
    assert last.blocked is None and "".join(sent) + last.text == "I like bananas and more"
    f = StreamFilter(rules, 48)
    out = [f.feed(p) for p in ["I like ", "ban", "ana", " split", " words"]]
    out.append(f.feed("", final=True))
    assert [v.blocked.name for v in out if v.blocked] == ["no-banana"]
    assert "".join(v.text for v in out) == "I like "
    # Input rules: the output-only rule does not apply to prompts.
    assert apply_rules(_policy(tmp_path).rules_for("input"), "banana").blocked is None


def test_luhn_separates_cards_from_other_numbers() -> None:
    assert luhn_ok("4111 1111 1111 1111") and not luhn_ok("4111 1111 1111 1112")
    from pagellm.policy.config import parse_policy

    rules = parse_policy({"guardrails": {"pii": {"types": ["card"]}}}).rules
    assert apply_rules(rules, "order 4111 1111 1111 1112 shipped").text.endswith("1112 shipped")


def test_repetition_detector_finds_short_cycles_only() -> None:
    d = RepetitionDetector(RepetitionConfig(max_period=4, min_repeats=5))
    assert not d.add([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3])  # 4 repeats of a 3-cycle
    assert d.add([1, 2, 3])  # the fifth
    d = RepetitionDetector(RepetitionConfig(max_period=2, min_repeats=3))
    assert not d.add([5, 6, 7, 5, 6, 7, 5, 6, 7])  # period 3 is past max_period
    rng = random.Random(0)
    d = RepetitionDetector(RepetitionConfig())
    assert not any(d.add([rng.randrange(1000)]) for _ in range(2000))


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "guardrails:\n  rules:\n    - words: [a]\n      action: explode\n",
            "line 4: action must be",
        ),
        ("keys:\n  - name: x\n", "line 2: keys[0] needs a key"),
        ("guardrails:\n  rules:\n    - regex: 'a('\n", "line 3: rule 'rule-0': bad regex"),
        ("repetition:\n  max_period: 0\n", "line 2: max_period must be an integer >= 1"),
        ("limits: {}\n", "line 1: the policy: unknown key 'limits'"),
        ("keys:\n  - key: a\n    requests_per_minute: many\n", "line 3: requests_per_minute"),
        ("guardrails: [\n", "not valid YAML"),
    ],
)
def test_bad_policy_names_the_line(tmp_path: Any, text: str, where: str) -> None:
    with pytest.raises(PolicyError, match=r"policy\.yaml") as e:
        _policy(tmp_path, text)
    assert where in str(e.value)


def test_burst_passes_exactly_the_limit_then_429_with_retry_after() -> None:
    state = KeyState(KeyLimits("k", "alice", requests_per_minute=3, tokens_per_minute=1000))
    passed, refused = 0, []
    for _ in range(6):
        try:
            entry, _ = state.admit(100)
            state.settle(entry, 20, 30)
            passed += 1
        except APIError as e:
            refused.append(e)
    assert passed == 3 and len(refused) == 3
    e = refused[0]
    assert e.status == 429 and e.code == "rate_limit_exceeded"
    assert 1 <= int(e.headers["retry-after"]) <= 60
    assert e.headers["x-ratelimit-remaining-requests"] == "0"
    assert e.headers["x-ratelimit-limit-tokens"] == "1000"
    # Settled at real use: 3 x (20 + 30) of the 1000 tokens.
    assert e.headers["x-ratelimit-remaining-tokens"] == "850"
    assert state.usage == {"requests": 3, "rejected": 3, "prompt_tokens": 60,
                           "completion_tokens": 90}  # fmt: skip


def test_token_and_concurrency_limits() -> None:
    state = KeyState(KeyLimits("k", "bob", tokens_per_minute=500, max_concurrent=2))
    a, _ = state.admit(200)
    state.admit(200)
    with pytest.raises(APIError, match="concurrent") as e:
        state.admit(10)
    assert e.value.headers["retry-after"] == "1"
    state.settle(a, 200, 0)
    with pytest.raises(APIError, match="tokens per minute"):
        state.admit(200)  # 400 in the window + 200 > 500
    with pytest.raises(APIError, match="Request too large"):
        state.admit(501)
