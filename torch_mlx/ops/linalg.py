"""Linear algebra: mm, bmm, addmm, baddbmm, matmul, linear, dot/mv, einsum via decomposition, linalg.*."""
