import sys

from edgeroute.cli import main

# Guarded: a process `router train` spawns for its parallel fits imports this module again.
if __name__ == "__main__":
    sys.exit(main())
