import sys

from lshmoe.cli import main

sys.exit(main())
