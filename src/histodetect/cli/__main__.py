"""`python -m histodetect.cli`: the same as the `histodetect` command."""

import sys

from histodetect.cli.main import main

sys.exit(main())
