"""Sentiment Analyzer Pro runtime: ONNX Runtime inference behind FastAPI.

This package never imports torch or transformers.
"""

__version__ = "0.1.0"
