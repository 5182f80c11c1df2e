"""edgekd: prune, distill, quantize, export and benchmark PyTorch models for edge deployment."""

__version__ = "0.1.0"
