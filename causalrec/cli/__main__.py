"""``python -m causalrec.cli`` (as ``python -m causalrec``)."""

import sys

from causalrec.cli import main

sys.exit(main())
