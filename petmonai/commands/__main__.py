"""``python -m petmonai.commands <command> ...``: the ``petmonai`` command line without its console script."""

import sys

from petmonai.commands.cli import main

if __name__ == "__main__":
    sys.exit(main())
