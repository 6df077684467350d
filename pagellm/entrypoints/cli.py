"""The ``pagellm`` command: generate, serve, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from pagellm import __version__

Handler = Callable[[argparse.Namespace], int]

# Engine options `pagellm generate` cannot use (one prompt, no server): left off its parser
# rather than accepted and ignored.
GENERATE_SKIPS = (
    "enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "pooling",
    "served_model_name", "structured_outputs_backend", "structured_outputs_config",
    "scheduling_policy",
)  # fmt: skip


def normalize_argv(argv: list[str]) -> list[str]:
    """vLLM accepts ``--foo_bar`` (and ``--foo_bar=value``) for ``--foo-bar``: so does
    pagellm. Only option names change, never values; ``--`` ends the options."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--sample-seed", type=int, default=None, help="per-request seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--min-tokens", type=int, default=0)


def _generate(args: argparse.Namespace) -> int:
    from pagellm.engine.arg_utils import EngineArgs
    from pagellm.engine.llm_engine import LLMEngine
    from pagellm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.sample_seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        min_tokens=args.min_tokens,
        output_kind=RequestOutputKind.DELTA,
    )
    engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
    prompt: str = args.prompt
    add_special = True
    if args.chat:
        messages = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        messages.append({"role": "user", "content": prompt})
        prompt = engine.input_processor.apply_chat_template(messages)
        add_special = False
    engine.add_request("cli", prompt, params, add_special_tokens=add_special)
    finish = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            sys.stdout.write(out.outputs[0].text)
            sys.stdout.flush()
            finish = out.outputs[0].finish_reason or finish
    sys.stdout.write("\n")
    logging.getLogger("pagellm").info("finish_reason=%s", finish)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pagellm.engine.arg_utils import EngineArgs

    parser = argparse.ArgumentParser(prog="pagellm", description="LLM inference and serving")
    parser.add_argument("--version", action="version", version=f"pagellm {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream one completion to the terminal")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    EngineArgs.add_cli_args(gen, skip=GENERATE_SKIPS)
    add_sampling_args(gen)
    gen.set_defaults(handler=_generate)

    from pagellm.entrypoints.openai import api_server, run_batch

    api_server.add_parser(sub)
    run_batch.add_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    from pagellm.benchmarks import (
        grammar,
        html_report,
        latency,
        parallel,
        perplexity,
        roofline,
        semantic_cache,
        serve,
        speculative,
        throughput,
    )

    for module in (throughput, serve, latency, roofline, perplexity, grammar, speculative,
                   parallel, semantic_cache, html_report):  # fmt: skip
        module.add_parser(bench)
    return parser


def parse_args(
    argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """Parse the command line (vLLM's spellings included) and check the engine options
    without loading a model: a configuration error exits with status 2 and one line on
    stderr, as argparse's own errors do."""
    from pagellm.engine.arg_utils import EngineArgs

    parser = parser or build_parser()
    args = parser.parse_args(normalize_argv(sys.argv[1:] if argv is None else list(argv)))
    if hasattr(args, "kv_cache_dtype"):  # a command with engine options
        try:
            EngineArgs.from_cli_args(args)._check()
        except ValueError as e:
            _subparser(parser, args).error(str(e))
    return args


def _subparser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The (sub)command's own parser, so that its error names it (``pagellm serve: error``)."""
    for dest in ("command", "bench"):
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, dest, None)
        if not actions or name not in actions[0].choices:
            break
        parser = actions[0].choices[name]
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except ValueError as e:
        print(f"pagellm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
