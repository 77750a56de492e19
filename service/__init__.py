"""The online half of dede: an HTTP service scoring images with a bundle's ONNX graph.

Imports no torch, torchvision or training code: only models/bundle.py crosses from the offline half.
Entry points: `service.main.run(settings)` and `python -m service`.
"""
