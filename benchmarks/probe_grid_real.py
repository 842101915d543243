"""The linear probe grid against scikit-learn on real features: every layer of a model (default
toto-tiny) on the data world's ImageNet, the mean-pooled features `totobench run --tasks
imagenet-linear` caches (extracted here on a cache miss). Prints both wall times, their ratio and
each layer's val top-1 from both sides.

    .venv/bin/python benchmarks/probe_grid_real.py [--real MODEL] [--threads 1]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_grid import main  # noqa: E402

if __name__ == "__main__":
    if "--real" not in sys.argv:
        sys.argv[1:1] = ["--real", "toto-tiny"]
    main()
