"""`python -m fl_server.admin` (see fl_server/admin/__init__.py)."""

import sys

from fl_server.admin import main

sys.exit(main())
