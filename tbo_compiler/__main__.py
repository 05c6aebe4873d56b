"""`python -m tbo_compiler ...` is `tbo-compile ...`."""
import sys

from tbo_compiler.cli import main

sys.exit(main())
