"""Shared test setup. Without CUDA, Triton kernels run under Triton's interpreter on CPU tensors;
the variable must be set before anything imports triton, so it is set here, first."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# tests import the top-level scripts (model.py, data.py, ...) as modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
