import sys

from edgeroute.bench.cli import main

sys.exit(main())
