"""``python -m fcconv``: the command line, as the ``fcconv`` script runs it.

``python -m`` puts the working folder first on ``sys.path``; it is taken off
before anything else is imported, so that a file in the folder where the user
runs fcconv (a ``rich.py``, a ``safetensors/``) can never shadow a module
fcconv imports. ``--arch`` finds the user's own modules on its own terms.
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.getcwd():
    del sys.path[0]

from fcconv.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
