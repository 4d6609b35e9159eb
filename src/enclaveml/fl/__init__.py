"""Federated learning: horizontal FL with the aggregator in a TEE, and vertical FL."""
