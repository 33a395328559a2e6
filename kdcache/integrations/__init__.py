"""Adapters that let other trainers distil from a kdcache cache (each imports its framework lazily)."""
