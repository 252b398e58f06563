"""``python -m websockify.agent``."""

import sys

from websockify.agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
