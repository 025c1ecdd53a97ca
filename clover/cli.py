"""The ``clover`` command (also ``python -m clover`` and ``python -m clover.cli``): one subcommand per job, each the
entry point of its module, whose own command line keeps working; and the ``generate`` and ``chat`` subcommands
themselves (plain or speculative decoding with any supported model; the work is done by :mod:`clover.generate`).
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import sys

import torch

from clover import __version__
from clover.args import (CloverArgumentParser, add_base_model, add_draft, add_max_new_tokens, add_runtime,
                         add_sampling, add_tree, invoked_as)
from clover.errors import run_cli

# subcommand: (module, its entry point, what it does); the module's own command line is ``python -m module``
COMMANDS = {
    "generate": ("clover.cli", "generate_main", "answer one prompt, plain or speculative"),
    "chat": ("clover.cli", "generate_main", "interactive multi-turn chat"),
    "serve": ("clover.serve.__main__", "main", "an OpenAI-compatible HTTP server"),
    "regenerate": ("clover.ge_data.regenerate", "main", "the base model's own replies to a conversation set"),
    "data": ("clover.ge_data.allocation", "main", "training data: the base model's hidden states on conversations"),
    "train": ("clover.train.trainer", "main", "train a draft: clover train clover2|eagle --data-dir D --outdir O"),
    "gen-answer": ("clover.evaluation.gen_answer", "main", "Spec-Bench answer file of one method"),
    "compare": ("clover.evaluation.compare", "main", "every method on the same questions: table, JSON, figures"),
    "speed": ("clover.evaluation.speed_spe", "main", "tokens/s and speedup of answer files (Spec-Bench's speed)"),
    "tau": ("clover.evaluation.tau_spe", "main", "mean accepted length of an answer file"),
    "pipeline": ("clover.pipeline", "main", "the main job: data, both drafts, the comparison"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: clover <command> [flags]   (clover <command> --help lists the flags)", "",
             "Clover-2 speculative decoding: generate, serve, make training data, train drafts, evaluate.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, _, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    """``clover <command> [flags]``: run the command's entry point with the flags, named ``clover <command>`` in its
    usage and error lines."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    if argv[0] == "--version":
        print(f"clover {__version__}")
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        print(f"error: unknown command {name!r}" + (f"; did you mean {close[0]!r}?" if close else "") +
              f" (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        raise SystemExit(2)
    if name == "train":
        from clover.model.registry import draft_names

        types, draft_type = "|".join(draft_names()), rest[0] if rest else None
        if draft_type in ("-h", "--help"):
            print(f"usage: clover train {types} [flags]   (clover train {draft_names()[0]} --help lists the flags)\n"
                  f"       clover train {','.join(draft_names())} [flags]   (several drafts on one base pass, each in "
                  f"OUTDIR/<type>/)")
            return
        if draft_type is not None and "," in draft_type:  # several drafts on one base pass
            from clover.train.joint import main as joint_main

            with invoked_as(f"clover train {draft_type}"):
                joint_main(draft_type.lower().split(","), rest[1:])
            return
        if draft_type is None or draft_type.lower() not in draft_names():
            print(f"error: clover train needs the draft type first: clover train {types} [flags], or several "
                  f"trained together: clover train {','.join(draft_names())} [flags] (got {draft_type!r})",
                  file=sys.stderr)
            raise SystemExit(2)
        from clover.train.trainer import main as train_main

        with invoked_as(f"clover train {draft_type}"):
            train_main(draft_type, rest[1:])
        return
    module, function, _ = COMMANDS[name]
    entry = getattr(importlib.import_module(module), function)
    if name in ("generate", "chat"):
        with invoked_as("clover"):
            run_cli(lambda: entry([name, *rest]))
        return
    with invoked_as(f"clover {name}"):
        run_cli(lambda: entry(rest))


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``generate`` and ``chat``."""
    parser = CloverArgumentParser(prog="python -m clover.cli", description="Plain or speculative decoding with any "
                                  "supported model: generate answers one prompt, chat holds a conversation.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("generate", "answer one prompt"), ("chat", "interactive multi-turn chat")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_base_model(p)
        add_draft(p)
        add_tree(p, node_paths=True)
        add_sampling(p)
        add_max_new_tokens(p, 256)
        p.add_argument("--template", default="auto", help="chat template: auto|tokenizer|vicuna|llama3|chatml")
        p.add_argument("--system", default=None, help="system prompt")
        add_runtime(p)
        if name == "generate":
            p.add_argument("--prompt", required=True, help="the user message")
    return parser


def load_generator(args):
    """(generate-function, tokenizer, template) for the chosen model, draft and tree."""
    from clover.data.templates import get_template
    from clover.generate.loader import load_decoding
    from clover.generate.sampling import SamplingParams
    from clover.model.loading import load_tokenizer

    tokenizer = load_tokenizer(args.base_model)
    template = get_template(tokenizer, args.template, system_prompt=args.system)
    tree = _parse_tree(args.tree) if args.draft and args.tree.lstrip().startswith("[") else args.tree
    decoding = load_decoding(args.base_model, args.draft, tree=tree, tree_budget=args.tree_budget, dtype=args.dtype,
                             device=args.device, max_len=args.max_len,
                             compile=args.compile)  # tree_budget: checked by the parser
    params = SamplingParams(args.temperature, args.top_p, args.top_k)

    def stream(ids, generator):
        return decoding.stream(ids, params, args.max_new_tokens, template.stop_token_ids, generator)
    return stream, tokenizer, template


def _parse_tree(text: str):
    import ast

    from clover.errors import CloverError

    try:
        return [tuple(p) for p in ast.literal_eval(text)]
    except (ValueError, SyntaxError, TypeError):
        raise CloverError(f"--tree: cannot parse {text!r} as a list of node paths like [[0], [1], [0, 0]]") from None


def respond(stream, tokenizer, ids, generator, out=sys.stdout) -> tuple[str, object]:
    """Stream one answer to ``out``; return its text and the GenerationResult."""
    gen = stream(ids, generator)
    tokens, printed = [], ""
    while True:
        try:
            tokens.extend(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(printed):])
            out.flush()
            printed = text
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    out.write(text[len(printed):] + "\n")
    print(f"[{result.new_tokens} tokens in {result.wall_time:.2f} s = {result.new_tokens / result.wall_time:.1f} "
          f"tokens/s; {result.steps} steps, mean accepted length {result.tau:.2f}; {result.finish_reason}]",
          file=sys.stderr)
    return text, result


def generate_main(argv=None) -> None:
    """``generate`` or ``chat`` (the first word of ``argv``) with its flags."""
    args = build_parser().parse_args(argv)
    stream, tokenizer, template = load_generator(args)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    if args.command == "generate":
        ids = template.encode_prompt([{"role": "user", "content": args.prompt}])
        respond(stream, tokenizer, ids, generator)
        return
    messages = []
    print("chat: type a message, an empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        text, _ = respond(stream, tokenizer, template.encode_prompt(messages), generator)
        messages.append({"role": "assistant", "content": text})


if __name__ == "__main__":
    main()
