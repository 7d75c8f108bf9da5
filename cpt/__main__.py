import sys

from cpt.cli import main

sys.exit(main())
