"""`python -m plan --config C --topology T`: see plan/__init__.py."""
import sys

from plan.cli import main

sys.exit(main())
