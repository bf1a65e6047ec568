"""Standalone measurements, run from the repository root as ``python -m benchmarks.NAME``.

Each module's docstring gives its command. They report ratios measured in one run (over the
matmul peak of :mod:`training.measure`, over another variant), never absolute targets.
"""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
