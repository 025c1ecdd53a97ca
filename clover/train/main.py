"""Train the EAGLE-1 baseline draft: ``clover train eagle --base-model B --data-dir DATA --outdir OUT``, the same
as ``python -m clover.train.main ...`` or, on several GPUs, ``accelerate launch -m clover.train.main ...``; the same
flags as Clover-2's, with EAGLE's defaults (lr 3e-5). The flags live in :mod:`clover.train.cli`, the loop in
:mod:`clover.train.trainer`."""
from clover.train.trainer import main

if __name__ == "__main__":
    main("eagle")
