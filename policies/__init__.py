"""Routing policies: one class per router behind `policies.base.Policy`, one registry."""
