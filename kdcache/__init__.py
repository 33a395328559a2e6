"""kdcache: pay the teacher once, distil many students from cached top-k soft targets."""

__version__ = "0.1.0"
