"""Stage two: train students from a cache (stream -> sparse-target losses -> plain PyTorch loop).

Imports only kdcache.cache and kdcache.errors, never kdcache.dump.
"""
