import sys

from qwenbuild.cli import main

sys.exit(main())
