"""The MLX paged-attention backend (backend.py), its implementation (impl.py) and kernels (paged.py)."""
