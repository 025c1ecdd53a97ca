"""Train a Clover-2 draft: ``clover train clover2 --base-model B --data-dir DATA --outdir OUT``, the same as
``python -m clover.train.main_clover2 ...`` or, on several GPUs, ``accelerate launch -m clover.train.main_clover2
...``; ``--help`` lists every flag. Flags: :mod:`clover.train.cli`; the loop: :mod:`clover.train.trainer`."""
from clover.train.trainer import main

if __name__ == "__main__":
    main("clover2")
