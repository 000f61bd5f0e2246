"""`python -m pixtral_lora.cli` (what `predict --num-processes` starts in each worker)."""

import sys

from pixtral_lora.cli import main

sys.exit(main())
