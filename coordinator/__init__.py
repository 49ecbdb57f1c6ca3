"""Coordinator: Flower ServerApp, per-expert aggregation strategy, model store, round schedule."""
