"""Real parts for tests and the demo: a local control plane, a Redis server, a mock LLM.

Like ``kopf.testing``, shipped with the package so ``make demo`` and users' own tests can use
them; the operator's run-time code never imports this package.
"""
