"""The response cache: exact answers per route and tenant, streams replayed, stale-if-error.

`service` is what the request path calls; `key`, `entry` and `stores` are its parts;
`settings` holds the configuration models (imported by the config schema).
"""
