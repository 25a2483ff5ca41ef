"""Model build pipeline: fine-tune, export to ONNX, quantize, verify, evaluate.

torch and transformers are imported only inside this package (never by ``server``).
"""
