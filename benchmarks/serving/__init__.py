"""Serving-speed benchmark of the detection service: `python -m benchmarks.serving.run --bundle DIR`."""
