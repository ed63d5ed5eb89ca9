"""``python -m atesd_ray.gpu_check``: see the package doc."""

import sys

from atesd_ray.gpu_check import main

sys.exit(main())
