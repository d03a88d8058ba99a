"""``python -m sweeper.cache``: build (or reuse) or verify a sweep config's feature cache (``build.main``)."""

import sys

from sweeper.cache.build import main

sys.exit(main())
