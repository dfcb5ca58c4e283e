"""Makes the repository root importable (`import dcae`, `import kernels.linear_attention`) from any test."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
