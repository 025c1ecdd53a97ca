"""Train a Clover-2 draft: ``accelerate launch -m clover.train.main_clover2 --base-model B --data-dir DATA
--ckpt-dir CKPT`` (or plain ``python -m clover.train.main_clover2 ...`` for one process); ``--help`` lists every flag.
Flags: :mod:`clover.train.cli`; the loop: :mod:`clover.train.trainer`."""
from clover.train.trainer import main

if __name__ == "__main__":
    main("clover2")
