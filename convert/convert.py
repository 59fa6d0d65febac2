"""The converter's entry script for a source checkout: `python convert/convert.py SRC DST [--dtype bf16] ...`.

The same command as the installed `glance-jax convert` (glance_jax/convert.py); see convert/README.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's glance_jax

from glance_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
