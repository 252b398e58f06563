"""``python -m websockify``."""

import sys

from websockify.cli import main

if __name__ == "__main__":
    sys.exit(main())
