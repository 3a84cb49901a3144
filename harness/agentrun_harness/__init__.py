"""Real parts for tests, benchmarks and ``make demo``: a local control plane, a node with
kubelet and containerd, a Redis server, the operator and the SSE server as processes.

Not part of the product: the wheel and the image never contain it (tests/unit/test_wheel.py
lists the wheel's files), and the product never imports it (an import-linter contract).
It is on the path of the development environment only (``dev-mode-dirs`` in pyproject.toml).
"""
