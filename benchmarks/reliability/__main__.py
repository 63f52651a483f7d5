"""`python -m benchmarks.reliability [--quick] [--only swap,crash] [--soak-s S] [--work DIR]`."""

import sys

from benchmarks.reliability.runner import main

sys.exit(main())
