"""fisherstore benchmarks: run as ``python -m benchmarks.<name> --help``."""
