"""Operators' tooling, outside the Flower app bundle: SuperLink and local-cluster processes,
keys and certificates, the `flwr` CLI wrapper, the monthly schedule and the node agent.

Sits above coordinator/ and hospital_node/ and below cli/ (pyproject's import-linter layers);
never listed in `[tool.flwr.app] fab-include`, so no hospital receives it in the app bundle.
"""
