"""Command line: ``clover serve --base-model M [--draft D] ...`` (or ``python -m clover.serve``) — serve one model
over OpenAI's API.

Argument parsing only; the model and its queue are :mod:`clover.serve.engine`, the routes :mod:`clover.serve.app`.
"""
from __future__ import annotations

import argparse
import logging
import os

from clover.args import (CloverArgumentParser, add_base_model, add_draft, add_runtime, add_tree, non_negative_int,
                         positive_int)
from clover.errors import CloverError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = CloverArgumentParser(prog="python -m clover.serve", description=__doc__)
    add_base_model(p)
    add_draft(p)
    add_tree(p, node_paths=True)
    add_runtime(p)
    p.add_argument("--template", default="auto", help="chat template: auto|tokenizer|vicuna|llama3|chatml")
    p.add_argument("--system", default=None, help="system prompt used when a conversation has none")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("CLOVER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $CLOVER_API_KEY; none = open)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send and /v1/models lists "
                                                             "(default: the --base-model value)")
    p.add_argument("--max-batch-size", type=positive_int, default=8, metavar="N",
                   help="requests decoded together, each in a row of its own KV cache of --max-len tokens")
    p.add_argument("--max-waiting", type=non_negative_int, default=64, metavar="N",
                   help="requests that may wait for a row; more are answered 429 with Retry-After (0 = no bound)")
    p.add_argument("--sequential", action="store_true",
                   help="one request at a time, the engine before batching (for comparisons)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn

        from clover.serve.app import create_app
    except ImportError as err:
        raise CloverError(f"the server needs the 'serve' extra ({err.name} is missing): pip install -e .[serve]") \
            from None
    from clover.serve.batching import BatchedEngine
    from clover.serve.engine import Engine

    if args.max_len < 2:
        raise CloverError(f"--max-len must be at least 2, got {args.max_len}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("clover.serve")
    log.info("loading %s%s", args.base_model, f" with draft {args.draft}" if args.draft else "")
    common = dict(tree=args.tree, tree_budget=args.tree_budget, dtype=args.dtype, device=args.device,
                  max_len=args.max_len, template=args.template, system=args.system, compile=args.compile)
    if args.sequential:
        engine = Engine.load(args.base_model, args.draft, **common)
    else:
        engine = BatchedEngine.load(args.base_model, args.draft, max_batch_size=args.max_batch_size,
                                    max_waiting=args.max_waiting, **common)
    name = args.served_model_name or args.base_model
    log.info("serving %r (%s) on http://%s:%d/v1%s", name, engine.description, args.host, args.port,
             ", API key required" if args.api_key else "")
    uvicorn.run(create_app(engine, name, args.api_key), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    run_cli(main)
