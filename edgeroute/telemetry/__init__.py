"""Observability of the running proxy: metrics wiring, logs, traces, alerts, deployment history.

Modules: `app` (what a finished request feeds, and the routes and tasks of this package),
`logs` (logging set-up), `settings` (the config sections; imports nothing of edgeroute).
"""
