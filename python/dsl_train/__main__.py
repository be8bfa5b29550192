"""``python -m dsl_train`` = ``dsl-train``."""
import sys

from .cli import main

sys.exit(main())
