import sys

from sslpt.engine.cli import main

sys.exit(main())
