import sys

from causalrec.cli import main

sys.exit(main())
