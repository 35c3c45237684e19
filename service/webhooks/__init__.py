"""Webhooks: a tenant's endpoints and the outbox of deliveries the worker-side sender posts."""
