"""Serving policy: guardrails, per-key limits and dead-loop stops, configured by one
policy file (docs/policy.md) and applied as a step around the engine client."""
