"""vLLM's command lines on pagellm (docs/vllm_flags.md): parsed, never a model loaded.

Every flag either acts (the EngineArgs value is asserted), is refused (exit status 2 and
one line naming what pagellm offers) or warns once. The seed documents' own command lines
are extracted and parsed as written, with `vllm` replaced by `pagellm`.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pagellm.engine import arg_utils
from pagellm.engine.arg_utils import EngineArgs
from pagellm.entrypoints import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def parse(parser: argparse.ArgumentParser, line: str) -> EngineArgs:
    return EngineArgs.from_cli_args(cli.parse_args(shlex.split(line), parser))


def refused(parser: argparse.ArgumentParser, line: str, capsys: Any) -> str:
    """The one-line message of a refused command line (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(shlex.split(line), parser)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pagellm"), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


# ---- the seed documents' command lines ------------------------------------------------

# (seed command line with `vllm` -> `pagellm`, None if accepted / the refusal's text)
SEED_COMMANDS: dict[str, str | None] = {
    "python3 -m pagellm.entrypoints.openai.api_server --model /workspace/code/qwen2.5/7B "
    "--tensor_parallel_size 1 --enable_lora --lora-modules "
    "lora_1=/workspace/code/qwen2.5-7b/lora_1 lora_2=/workspace/code/qwen2.5-7b/lora2": None,
    # `--env` is docker's flag (`docker run --env`), not vLLM's: refused as unknown.
    "python -m pagellm.entrypoints.api_server --env MODEL_NAME=huggingllama/llama-13b": (
        "unrecognized arguments: --env"
    ),
    "pagellm serve /path/to/model --port 8000 --enable-lora --lora-modules "
    "my_lora={path/to/lora} --api-key token-abc123": None,
    "pagellm serve /path/to/model --port 8000 --enable-lora --lora-modules "
    "my_lora=/path/to/lora --api-key token-abc123 --chat-template "
    "/path/to/template_chatml.jinja": None,
    "pagellm serve Qwen/Qwen2.5-7B-Instruct --speculative-model Qwen/Qwen2.5-0.5B-Instruct "
    "--num-speculative-tokens 5": None,
    # Parses; the model's head counts are checked when the engine is built.
    "pagellm serve /path/to/model --tensor-parallel-size 8": None,
}
# Flags quoted inline in the seeds' prose: `--kv-cache-dtype=fp8`, `--cpu-offload-gb=4`.
SEED_INLINE_FLAGS = {"--kv-cache-dtype=fp8", "--cpu-offload-gb=4"}
SEED_LLM_CALLS = [
    {"model": "qwen/Qwen-7B-Chat", "revision": "v1.1.8", "trust_remote_code": True},
    {"model": "huggingllama/llama-13b"},
]


def _seeds_dir() -> Path | None:
    for d in (os.environ.get("PAGELLM_SEEDS_DIR"), ROOT / "shared" / "seeds", "/work/shared/seeds"):
        if d and Path(d).is_dir():
            return Path(d)
    return None


def _extract(text: str) -> tuple[list[str], set[str], list[dict[str, Any]]]:
    """vLLM command lines in the code blocks (continuations joined), inline `--flag=value`
    spans, and the keyword arguments of `LLM(...)` calls."""
    commands = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\s*\n", " ", block).splitlines():
            line = " ".join(line.split())
            if re.match(r"(vllm serve|python3? -m vllm\.entrypoints)\b", line):
                commands.append(re.sub(r"\bvllm\b", "pagellm", line, count=1))
    inline = set(re.findall(r"`(--[\w-]+=[^`\s]+)`", text))
    calls = []
    for m in re.finditer(r"\bLLM\((.*?)\)\n", text):
        call = ast.parse(f"f({m.group(1)})").body[0].value  # type: ignore[attr-defined]
        calls.append({k.arg: ast.literal_eval(k.value) for k in call.keywords})
    return commands, inline, calls


def test_the_seeds_hold_the_command_lines_listed_here() -> None:
    seeds = _seeds_dir()
    if seeds is None:
        pytest.skip("the seed documents are not here (set PAGELLM_SEEDS_DIR)")
    commands, inline, calls = [], set(), []
    for f in sorted(seeds.iterdir()):
        c, i, k = _extract(f.read_text(encoding="utf-8"))
        commands += c
        inline |= i
        calls += k
    assert sorted(set(commands)) == sorted(SEED_COMMANDS)
    assert inline == SEED_INLINE_FLAGS
    assert {tuple(sorted(c.items())) for c in calls} == {
        tuple(sorted(c.items())) for c in SEED_LLM_CALLS
    }


def _argv(line: str) -> str:
    """A seed command line as arguments of `pagellm`: both module forms mean `serve`."""
    line = re.sub(r"^python3? -m pagellm\.entrypoints\.(openai\.)?api_server", "serve", line)
    return line.removeprefix("pagellm ")


@pytest.mark.parametrize("line", sorted(SEED_COMMANDS))
def test_seed_command_lines_parse_or_are_refused_clearly(
    parser: argparse.ArgumentParser, line: str, capsys: Any
) -> None:
    why = SEED_COMMANDS[line]
    if why is None:
        parse(parser, _argv(line))
    else:
        assert why in refused(parser, _argv(line), capsys)


def test_seed_command_lines_map_to_vllms_meaning(parser: argparse.ArgumentParser) -> None:
    lines = sorted(SEED_COMMANDS)
    multi = next(line for line in lines if "lora_1" in line)
    multi_lora = parse(parser, _argv(multi))
    assert (multi_lora.model, multi_lora.tensor_parallel_size, multi_lora.enable_lora) == (
        "/workspace/code/qwen2.5/7B", 1, True,
    )  # fmt: skip
    ns = cli.parse_args(shlex.split(_argv(multi)), parser)
    assert ns.lora_modules == [
        "lora_1=/workspace/code/qwen2.5-7b/lora_1", "lora_2=/workspace/code/qwen2.5-7b/lora2",
    ]  # fmt: skip
    template = next(line for line in lines if "--chat-template" in line)
    ns = cli.parse_args(shlex.split(_argv(template)), parser)
    e = EngineArgs.from_cli_args(ns)
    assert (e.model, e.enable_lora, e.chat_template) == (
        "/path/to/model", True, "/path/to/template_chatml.jinja",
    )  # fmt: skip
    assert (ns.port, ns.api_key) == (8000, "token-abc123")
    spec = parse(parser, _argv(next(line for line in lines if "speculative" in line)))
    assert spec.model == "Qwen/Qwen2.5-7B-Instruct"
    assert spec._speculative_spec() == {
        "model": "Qwen/Qwen2.5-0.5B-Instruct", "num_speculative_tokens": 5,
    }  # fmt: skip


def test_seed_inline_flags(parser: argparse.ArgumentParser) -> None:
    e = parse(parser, "serve m " + " ".join(sorted(SEED_INLINE_FLAGS)))
    assert e.kv_cache_dtype == "fp8_e4m3"  # vLLM's fp8 is e4m3, which pagellm has
    assert e.cpu_offload_gb == 4
    e._check_for_device("cuda")  # the GPU streams 4 GiB of layers from host memory
    e.weight_mmap_dir = "/var/tmp"
    with pytest.raises(ValueError, match="weight_mmap_dir maps the weights on the CPU"):
        e._check_for_device("cuda")


def test_seed_llm_keyword_arguments() -> None:
    for kwargs in SEED_LLM_CALLS:
        EngineArgs(**kwargs)._check()
    # The seeds' "LLM parameters": tensor_parallel_size, gpu_memory_utilization, swap space.
    EngineArgs(tensor_parallel_size=1, gpu_memory_utilization=0.9, swap_space=4)._check()
    EngineArgs(tensor_parallel_size=2, pipeline_parallel_size=2)._check()
    EngineArgs(data_parallel_size=2)._check()
    with pytest.raises(ValueError, match="data_parallel_size must be"):
        EngineArgs(data_parallel_size=0)._check()
    with pytest.raises(ValueError, match="uni runs one worker"):
        EngineArgs(tensor_parallel_size=2, distributed_executor_backend="uni")._check()
    with pytest.raises(ValueError, match="external_launcher"):
        EngineArgs(distributed_executor_backend="external_launcher")._check()
    with pytest.raises(ValueError, match=r"unknown keyword argument.*cpu_swap_space"):
        EngineArgs(cpu_swap_space=4)  # type: ignore[call-arg]  # vLLM's name is swap_space


# ---- spellings ------------------------------------------------------------------------


def test_underscores_are_dashes_and_values_are_untouched(parser: argparse.ArgumentParser) -> None:
    e = parse(parser, "serve --model my_dir/a_b --served_model_name my_model "
              "--max_model_len=128 --enable_prefix_caching --max-num_seqs 3")  # fmt: skip
    assert (e.model, e.served_model_name, e.max_model_len, e.max_num_seqs) == (
        "my_dir/a_b", "my_model", 128, 3,
    )  # fmt: skip
    assert cli.normalize_argv(["--a_b=c_d", "x_y", "--", "--e_f"]) == [
        "--a-b=c_d",
        "x_y",
        "--",
        "--e_f",
    ]


@pytest.mark.parametrize(
    ("value", "dtype"),
    [("half", "float16"), ("fp16", "float16"), ("bf16", "bfloat16"), ("float", "float32"),
     ("float32", "float32"), ("auto", "auto")],
)  # fmt: skip
def test_dtype_aliases(parser: argparse.ArgumentParser, value: str, dtype: str) -> None:
    assert parse(parser, f"serve m --dtype {value}").dtype == dtype


def test_bad_dtype_is_a_usage_error(parser: argparse.ArgumentParser, capsys: Any) -> None:
    assert "invalid choice: 'fp64'" in refused(parser, "serve m --dtype fp64", capsys)


def test_kv_cache_dtypes(parser: argparse.ArgumentParser, capsys: Any) -> None:
    for value, want in [("fp8", "fp8_e4m3"), ("fp8_e4m3", "fp8_e4m3"), ("int8", "int8"),
                        ("bf16", "bfloat16")]:  # fmt: skip
        assert parse(parser, f"serve m --kv-cache-dtype {value}").kv_cache_dtype == want
    msg = refused(parser, "serve m --kv-cache-dtype fp8_e5m2", capsys)
    assert "fp8_e5m2" in msg and "fp8_e4m3" in msg and "int8" in msg
    EngineArgs(kv_cache_dtype="fp8")._check()  # LLM(kv_cache_dtype="fp8") too
    with pytest.raises(ValueError, match="no fp8_e5m2 cache"):
        EngineArgs(kv_cache_dtype="fp8_e5m2")._check()


def test_model_positional_and_flag(parser: argparse.ArgumentParser, capsys: Any) -> None:
    assert parse(parser, "serve a/b").model == "a/b"
    assert parse(parser, "serve --model a/b").model == "a/b"
    assert parse(parser, "serve a/b --model a/b").model == "a/b"
    assert "the model is given twice" in refused(parser, "serve a/b --model c/d", capsys)


# ---- speculative decoding -------------------------------------------------------------


def test_speculative_spellings(parser: argparse.ArgumentParser, capsys: Any) -> None:
    e = parse(parser, "serve m --speculative-model '[ngram]' --num-speculative-tokens 3")
    assert e._speculative_spec() == {"model": "[ngram]", "num_speculative_tokens": 3}
    e = parse(
        parser, """serve m --speculative-config '{"model": "d", "num_speculative_tokens": 2}'"""
    )
    assert e._speculative_spec() == {"model": "d", "num_speculative_tokens": 2}
    msg = refused(parser, "serve m --num-speculative-tokens 5", capsys)
    assert "--num-speculative-tokens needs a method: --speculative-model" in msg
    assert "needs --num-speculative-tokens" in refused(
        parser, "serve m --speculative-model d", capsys
    )
    msg = refused(parser, """serve m --speculative-model d --num-speculative-tokens 2 """
                  """--speculative-config '{"method": "ngram", "num_speculative_tokens": 2}'""", capsys)  # fmt: skip
    assert "not both" in msg


# ---- parallelism ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "name"),
    [("--tensor-parallel-size", "tensor_parallel_size"), ("-tp", "tensor_parallel_size"),
     ("--pipeline-parallel-size", "pipeline_parallel_size"), ("-pp", "pipeline_parallel_size")],
)  # fmt: skip
def test_parallel_sizes(parser: argparse.ArgumentParser, flag: str, name: str) -> None:
    assert getattr(parse(parser, f"serve m {flag} 1"), name) == 1
    assert getattr(parse(parser, f"serve m {flag} 2"), name) == 2


@pytest.mark.parametrize("flag", ["--data-parallel-size", "-dp"])
def test_data_parallel_size(parser: argparse.ArgumentParser, capsys: Any, flag: str) -> None:
    assert parse(parser, f"serve m {flag} 1").data_parallel_size == 1
    assert parse(parser, f"serve m {flag} 2").data_parallel_size == 2
    assert "data_parallel_size must be" in refused(parser, f"serve m {flag} 0", capsys)


# ---- options that used to be ignored --------------------------------------------------


def test_lora_limits_need_enable_lora(parser: argparse.ArgumentParser, capsys: Any) -> None:
    for flag in ("--max-loras 4", "--max-lora-rank 16", "--max-cpu-loras 2"):
        msg = refused(parser, f"serve m {flag}", capsys)
        assert f"{flag.split()[0]} applies only with --enable-lora" in msg
    e = parse(parser, "serve m --enable-lora --max-loras 4 --max-lora-rank 16")
    assert (e.enable_lora, e.max_loras, e.max_lora_rank) == (True, 4, 16)
    e = parse(parser, "serve m --lora-modules a=/a --max-loras 2")  # --lora-modules implies it
    assert (e.enable_lora, e.max_loras) == (True, 2)
    with pytest.raises(ValueError, match="--max-loras applies only with --enable-lora"):
        EngineArgs(max_loras=2)._check()


def test_quantization_group_size_needs_int4(parser: argparse.ArgumentParser, capsys: Any) -> None:
    assert (
        parse(parser, "serve m -q int4 --quantization-group-size 128").quantization_group_size
        == 128
    )
    assert parse(parser, "serve m").quantization_group_size == 32
    msg = refused(parser, "serve m --quantization int8 --quantization-group-size 128", capsys)
    assert "--quantization-group-size applies only to --quantization int4" in msg


def test_generate_lists_only_options_it_uses(parser: argparse.ArgumentParser, capsys: Any) -> None:
    gen = cli._subparser(parser, argparse.Namespace(command="generate"))
    text = gen.format_help()
    for flag in ("--enable-lora", "--max-loras", "--max-lora-rank", "--max-cpu-loras",
                 "--pooling", "--served-model-name", "--structured-outputs-backend",
                 "--scheduling-policy", "--lora-modules", "--api-key"):  # fmt: skip
        assert flag not in text, flag
    assert "--speculative-config" in text and "--kv-cache-dtype" in text
    assert "unrecognized arguments: --enable-lora" in refused(
        parser, "generate hi --enable-lora", capsys
    )


@pytest.fixture
def warned(caplog: Any) -> Any:
    arg_utils._WARNED.clear()
    caplog.set_level(logging.WARNING, logger="pagellm.engine.arg_utils")
    yield caplog
    arg_utils._WARNED.clear()


@pytest.mark.parametrize(
    ("line", "device", "text"),
    [("--gpu-memory-utilization 0.5", "cpu", "gpu_memory_utilization=0.5 has no effect on CPU"),
     ("--trust-remote-code", "cpu", "trust_remote_code has no effect"),
     ("--cpu-offload-gb 2", "cpu", "cpu_offload_gb=2 has no effect on CPU")],
)  # fmt: skip
def test_warn_once(
    parser: argparse.ArgumentParser, warned: Any, line: str, device: str, text: str
) -> None:
    e = parse(parser, f"serve m {line}")
    e._check_for_device(device)
    e._check_for_device(device)
    hits = [r for r in warned.records if text in r.getMessage()]
    assert len(hits) == 1, [r.getMessage() for r in warned.records]


def test_silent_when_acting(parser: argparse.ArgumentParser, warned: Any) -> None:
    e = parse(parser, "serve m --gpu-memory-utilization 0.5 --swap-space 4 --enforce-eager "
              "--distributed-executor-backend uni --cpu-offload-gb 0")  # fmt: skip
    e._check_for_device("cuda")  # the GPU reads --gpu-memory-utilization
    parse(parser, "serve m")._check_for_device("cpu")
    assert not warned.records
    assert e.enforce_eager and e.gpu_memory_utilization == 0.5


def test_accepted_as_acting(parser: argparse.ArgumentParser) -> None:
    ns = cli.parse_args(shlex.split(
        "serve m --host 0.0.0.0 --port 9000 --served-model-name x --max-model-len 256 "
        "--max-num-seqs 8 --max-num-batched-tokens 256 --enable-prefix-caching "
        "--quantization awq --chat-template t.jinja --api-key k --seed 3 --block-size 32 "
        "--disable-log-requests --tokenizer tok --revision main --load-format auto "
        "--enable-chunked-prefill --enable-auto-tool-choice --tool-call-parser hermes "
        "--reasoning-parser deepseek_r1 --guided-decoding-backend llguidance "
        "--disable-log-stats"
    ), parser)  # fmt: skip
    e = EngineArgs.from_cli_args(ns)
    assert (ns.host, ns.port, ns.api_key, ns.enable_auto_tool_choice, ns.disable_log_requests) == (
        "0.0.0.0", 9000, "k", True, True,
    )  # fmt: skip
    assert (e.served_model_name, e.max_model_len, e.max_num_seqs, e.max_num_batched_tokens,
            e.quantization, e.seed, e.block_size, e.tokenizer, e.revision,
            e.structured_outputs_backend, e.log_stats) == (
        "x", 256, 8, 256, "awq", 3, 32, "tok", "main", "llguidance", False,
    )  # fmt: skip
    e = parse(parser, """serve m --structured-outputs-config '{"backend": "llguidance"}'""")
    assert e.structured_outputs_backend == "llguidance"


@pytest.mark.parametrize(
    ("line", "text"),
    [("--no-enable-chunked-prefill", "pagellm always chunks prefills"),
     ("--download-dir /d", "set HF_HUB_CACHE"),
     ("--load-format safetensors", "load_format 'safetensors' is not supported"),
     ("--guided-decoding-backend outlines", "must be auto, llguidance or xgrammar"),
     ("""--structured-outputs-config '{"backend": "auto", "x": 1}'""", 'reads only {"backend"'),
     ("--quantization fp8", "invalid choice: 'fp8'")],
)  # fmt: skip
def test_refused(parser: argparse.ArgumentParser, capsys: Any, line: str, text: str) -> None:
    assert text in refused(parser, f"serve m {line}", capsys)


def test_vllm_module_entry_point_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pagellm.entrypoints.openai.api_server", "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--tensor-parallel-size" in proc.stdout and "--lora-modules" in proc.stdout


def test_data_parallel_over_ray_needs_a_cluster(monkeypatch: Any) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="needs a running Ray cluster"):
        EngineArgs(data_parallel_size=2, distributed_executor_backend="ray")._check()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    EngineArgs(data_parallel_size=2, distributed_executor_backend="ray")._check()
