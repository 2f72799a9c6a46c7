import sys

from edgeroute.cli import main

sys.exit(main())
