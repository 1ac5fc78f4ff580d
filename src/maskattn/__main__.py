import sys

from maskattn.cli import main

sys.exit(main())
