"""Train the EAGLE-1 baseline draft: ``accelerate launch -m clover.train.main --base-model B --data-dir DATA
--ckpt-dir CKPT`` (or plain ``python -m clover.train.main ...``); same flags as :mod:`clover.train.main_clover2`,
with EAGLE's defaults (lr 3e-5). The flags live in :mod:`clover.train.cli`, the loop in :mod:`clover.train.trainer`."""
from clover.train.trainer import main

if __name__ == "__main__":
    main("eagle")
