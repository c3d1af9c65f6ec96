"""Prints the folder of the nvidia-cublas Python package's libcublas.so.* (empty when it is not installed):
bench/gpu/run.sh and moe.sh pass it on as VDIFF_CUBLAS_DIR, where the CUDA backend dlopens cuBLAS."""
import glob
import os

found = []
try:
    import nvidia

    for root in list(nvidia.__path__):
        found += glob.glob(os.path.join(root, "**", "libcublas.so.*"), recursive=True)
except Exception:
    pass
print(os.path.dirname(sorted(found)[0]) if found else "")
