"""`python -m train`: see train/main.py."""
import sys

from train.host import tune_malloc

tune_malloc()  # before JAX: the block cache and glibc huge pages for host allocations (train/host.py)
from train.main import main  # noqa: E402

sys.exit(main())
