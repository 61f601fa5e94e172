"""fewstep.kernels: Triton kernels with torch references (needs torch + triton)."""
