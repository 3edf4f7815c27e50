"""Shape ops that compute: cat, stack, flip, roll, repeat, tril/triu, pad, unfold, clone/contiguous."""
