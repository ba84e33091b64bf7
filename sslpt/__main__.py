"""``python -m sslpt ...``: the engine's command line."""
import sys

from sslpt.engine.cli import main

sys.exit(main())
