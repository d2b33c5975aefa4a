"""Compressors: the seam between local permutation and the dispatch all-to-all (protocol.py)."""
