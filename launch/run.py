#!/usr/bin/env python3
"""`timemoe-train --nproc-per-node N ...` from a checkout: the launcher is `timemoe_train/launch.py` (run with
--help for where each setting comes from)."""

import sys

from timemoe_train.launch import main

if __name__ == "__main__":
    sys.exit(main())
