"""Importable code behind the benchmark scripts.

- offline ONNX benchmark (``scripts/bench_onnx.py``): ``inputs``, ``runners``, ``offline``, ``report``
- server load test (``scripts/loadtest.py``): ``workload``, ``loadgen``, ``loadrun``, ``loadreport``
- shared: ``stats``, ``envinfo``, ``argtypes``
"""
