import os

# Triton kernels run in the interpreter on CPU-only machines; this must be set
# before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
