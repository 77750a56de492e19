"""Reliability benchmark of the detection service: `python -m benchmarks.reliability.run --bundle DIR`."""
