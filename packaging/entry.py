"""PyInstaller's entry point for dist/edgestate: the same command as the installed ``edgestate``."""

import sys

from edgestate.cli import main

if __name__ == "__main__":
    sys.exit(main())
