import sys

from dotattn.cli import main

sys.exit(main())
