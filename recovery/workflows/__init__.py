"""Workflows built from tasks: sagas and their compensations, the transactional outbox,
circuit breakers, degraded modes and the shared state they keep across workers.
"""
