"""``python -m spinegrade``: the same commands as the ``spinegrade`` script, for an interpreter
that has the package on its path without the script installed (a notebook, a GPU image)."""

import sys

from spinegrade.cli import main

sys.exit(main())
