import sys

from bsnn.cli import main

sys.exit(main())
