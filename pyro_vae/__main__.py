"""``python -m pyro_vae``: the ``pyro-vae`` command.

``python -m`` puts the current directory first on ``sys.path``, where a file named like a module
that pyro-vae imports (``tomllib.py``, ``torch.py``) would be imported in its place: the
directory moves to the end, so installed modules win and a user's own module in it is still
found (``--model mymodule:VAE``); commands that open a run do not search it at all.
"""

import os
import sys

if sys.path and os.path.realpath(sys.path[0] or os.curdir) == os.path.realpath(os.curdir):
    sys.path.append(sys.path.pop(0))

from pyro_vae.cli import main  # noqa: E402

sys.exit(main())
