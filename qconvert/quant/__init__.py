"""Quantisation choices and methods (GGUF mixtures; group-wise int4 comes next)."""
