"""Command line: ``python -m clover.cli generate|chat`` — plain or speculative decoding with any supported model.

Argument parsing only; the work is done by :mod:`clover.generate`.
"""
from __future__ import annotations

import argparse
import sys

import torch

from clover.args import (CloverArgumentParser, add_base_model, add_draft, add_max_new_tokens, add_runtime,
                         add_sampling, add_tree)
from clover.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = CloverArgumentParser(prog="python -m clover.cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("generate", "answer one prompt"), ("chat", "interactive multi-turn chat")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_base_model(p)
        add_draft(p)
        add_tree(p, "mc_sim_7b_63", node_paths=True)
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
    decoding = load_decoding(args.base_model, args.draft, tree=tree, budget=args.tree_budget, dtype=args.dtype,
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


def main(argv=None) -> None:
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
    run_cli(main)
