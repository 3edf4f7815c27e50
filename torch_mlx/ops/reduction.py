"""Reductions: sum, mean, prod, amax/amin, max/min (dim), argmax/argmin, all/any, var/std, norms, logsumexp."""
