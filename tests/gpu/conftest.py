"""CUDA checks: cuBLAS reads its workspace setting once per process, at its first handle, so the
deterministic-mode test needs it set before any test runs a matmul."""
import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
