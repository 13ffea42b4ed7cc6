"""`python -m fl_sim`: see fl_sim.cli."""

import sys

from fl_sim.cli import main

sys.exit(main())
