"""Makes the repository root importable (`import dcae`, `import kernels.linear_attention`) from any test, and
runs Triton kernels in Triton's CPU interpreter when there is no GPU. TRITON_INTERPRET must be set before
Triton is first imported, and any root file may import it, so it is set here, before any test module loads."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
