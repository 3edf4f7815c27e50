"""Indexing: index.Tensor, index_put_, index_select, index_copy_, gather, scatter*, masked_*, where, nonzero, take, embedding."""
