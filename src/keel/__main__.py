"""``python -m keel COMMAND ...``: the ``keel`` command, so torchrun can launch it (``torchrun ... -m keel train``)."""

import sys

from keel.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
