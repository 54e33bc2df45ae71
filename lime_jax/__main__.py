import sys

from lime_jax.cli import main

sys.exit(main())
