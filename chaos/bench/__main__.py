"""`python -m chaos.bench BENCHMARK ...` (the same as `watchdog-chaos bench BENCHMARK ...`)."""

import sys

from chaos.bench.cli import main

sys.exit(main())
