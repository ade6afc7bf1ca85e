#!/usr/bin/env python3
"""Command line of the relay: `python relay.py serve`, `python relay.py dev-upstream`, `--help`."""

import sys

from relay.cli import main

if __name__ == "__main__":
    sys.exit(main())
