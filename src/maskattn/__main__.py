import sys

from maskattn.cli import run

sys.exit(run())
