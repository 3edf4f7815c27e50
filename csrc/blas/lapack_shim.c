/* torch_mlx LAPACK shim: only its soname matters (csrc/blas/build_shims.py). */
