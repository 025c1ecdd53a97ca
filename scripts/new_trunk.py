"""Give a trained Clover-2 draft a new trunk: keep its AD0, heads, norms and draft vocabulary, start the trunk layers
afresh under other trunk switches, and write the result as a draft folder for ``clover train --init-draft``.

    python scripts/new_trunk.py clover2-smollm2-135m-instruct --trunk-input normed --trunk-init random \\
        --outdir runs/new_trunk/init

A way to try a trunk without training the heads from scratch again: the trunk layers (and, with ``--trunk-input
normed``, the input norm) are initialised as ``init_draft`` does for a new draft (``token_scale`` measured on the
base's states of a fixed random probe); every other trainable tensor is copied from the source draft. AD0 was trained
on the source's input scale; under ``normed`` its ``token_scale`` is measured again, so that the token side keeps its
share of the fused state.
"""
from __future__ import annotations

import torch

from clover.args import CloverArgumentParser
from clover.errors import run_cli
from clover.model.base import BaseModel
from clover.model.checkpoint import init_draft, load_draft, read_draft_config, save_draft

TRUNK_PREFIXES = ("layers.", "input_norm.")  # what a new trunk starts afresh


def new_trunk(source, base: BaseModel, **switches):
    """A Clover-2 draft with the trunk switches ``switches`` (e.g. ``trunk_init="random"``): new trunk layers, and
    every other trainable tensor of ``source`` (a draft folder or shipped name)."""
    old = load_draft(source, base, dtype=torch.float32, expected_type="clover2")
    block = {k: v for k, v in old.config["clover"].items() if k not in ("token_scale", *switches)}
    vocab = None if old.draft_vocab is None else old.draft_vocab.clone()
    new = init_draft("clover2", base, draft_vocab=vocab, **block, **switches)
    old_state, new_state = old.state_dict(), new.state_dict()
    kept = {k: old_state[k] for k in new_state if not k.startswith(TRUNK_PREFIXES)}  # same block: same shapes
    new.load_state_dict({**new_state, **kept}, strict=True)
    return new, sorted(set(new_state) - set(kept))


def main(argv=None) -> None:
    p = CloverArgumentParser(prog="python scripts/new_trunk.py", description=__doc__)
    p.add_argument("source", help="the trained Clover-2 draft: a checkpoint folder or a shipped name")
    p.add_argument("--outdir", required=True, help="where to write the new draft (config.json + model.safetensors)")
    p.add_argument("--trunk-input", choices=("prenorm", "normed"), default="normed")
    p.add_argument("--trunk-init", choices=("copy", "random"), default="random")
    p.add_argument("--seed", type=int, default=0, help="seed of the new trunk's initialisation")
    args = p.parse_args(argv)
    model = read_draft_config(args.source)["base"]["name_or_path"]
    base = BaseModel.from_pretrained(model, dtype="fp32", max_len=64)  # no decoding: a small cache
    torch.manual_seed(args.seed)
    draft, fresh = new_trunk(args.source, base, trunk_input=args.trunk_input, trunk_init=args.trunk_init)
    save_draft(draft, args.outdir)
    print(f"{args.outdir}: {len(fresh)} tensors new ({', '.join(sorted({k.split('.')[0] for k in fresh}))}), the "
          f"rest from {args.source}; token_scale {draft.token_scale:g}")


if __name__ == "__main__":
    run_cli(main)
