"""``python -m clover``: the ``clover`` command (see :mod:`clover.cli`)."""
from clover.cli import main

if __name__ == "__main__":
    main()
