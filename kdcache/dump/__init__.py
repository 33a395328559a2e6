"""Stage one: run a teacher once over a corpus and write its top-k soft targets (kdcache.cache format)."""
