"""Federated SAFN without Flower: partitioning, site-side steps, server-side aggregation.

The Flower apps in `server/` and `client/` are thin adapters over these functions, and the
in-process reference loop of the tests and benchmarks (`tests/reference_loop.py`) calls the
very same ones.
"""
