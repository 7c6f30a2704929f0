"""Entry point: `python -m melanoma_mil` and the `melanoma-mil` console script."""

import sys

from melanoma_mil.cli import main

if __name__ == "__main__":
    sys.exit(main())
