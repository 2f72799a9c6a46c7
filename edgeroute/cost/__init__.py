"""Cost control: prices, the spend ledger, budgets, rate limits, shared state and reports.

Modules (import them directly; this package root stays import-free):

- `prices`: the bundled, dated catalogue of public list prices and time-of-day windows;
- `ledger`: one row per request in SQLite (default) or PostgreSQL, written off the hot path;
- `keys`: virtual keys (bearer token -> key id, team, user, role), by hash;
- `budgets`, `limits`: reservation-based budgets and token-bucket rate limits (in process);
- `redis_store`: the same budgets and buckets shared across instances (Lua, atomic), its
  scripts in `redis_scripts` and its batched settlements in `redis_settle`;
- `store_errors`: what a shared store (Redis, the workers' SQLite) raises when it cannot answer;
- `control`: the `Admission` that combines them; `reports`: spend and savings reports.
"""
