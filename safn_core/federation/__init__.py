"""Federated SAFN without Flower: partitioning, site-side steps, server-side aggregation.

The Flower apps in `server/` and `client/` are thin adapters over these functions, and the
benchmark's in-process loop calls the very same ones.
"""
