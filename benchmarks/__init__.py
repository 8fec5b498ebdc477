"""causalrec benchmarks: speed, memory and quality of the fast paths (``python -m benchmarks``)."""
