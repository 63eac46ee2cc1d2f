"""``python -m actedit.cli`` (and ``torchrun --nproc_per_node N -m actedit.cli ...``): the ``actedit`` command."""

import sys

from . import main

sys.exit(main())
