"""`python -m gqa.train RECIPE.yaml [key=value ...]` (also under torchrun -m and accelerate launch -m)."""

import sys

from gqa.train.commands import main

sys.exit(main())
