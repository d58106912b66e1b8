"""`python -m regimen ...` is the same program as `regimen ...`."""

import sys

from regimen.cli import main

sys.exit(main())
