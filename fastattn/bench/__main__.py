"""``python -m fastattn.bench``: see :mod:`fastattn.bench.cli`."""

import sys

from fastattn.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
