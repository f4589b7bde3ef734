"""`python -m pockprop` is the `pockprop` command."""
import sys

from pockprop.cli import main

sys.exit(main())
