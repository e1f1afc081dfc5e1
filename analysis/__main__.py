"""`python -m analysis ...` is the `dori` command line."""

import sys

from analysis.cli import main

sys.exit(main())
