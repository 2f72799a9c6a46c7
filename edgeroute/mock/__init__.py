"""Mock upstream providers that speak each provider's real wire format.

Used by the demo (no keys, no network), by the tests, and by the bench harness.
"""
