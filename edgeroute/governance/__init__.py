"""Governance: managed keys, config versions and rollback, the audit log, residency.

`server.create_app` calls :func:`edgeroute.governance.app.install`.
"""
