"""The request log: one record per request and its attempts, and the analytics over them.

Modules (import them directly):

- `settings`: the `request_log:` config section (retention, size cap);
- `rows`: a `RequestRecord` turned into the `requests` table's row (ids and numbers);
- `rollup`: per-minute aggregates with latency histograms, kept beside the raw rows so that
  `/admin/stats` reads thousands of rows rather than millions;
- `store`: the tables, their indexes and retention; written by the spend ledger's writer
  (`cost.ledger`), in the same batches and transactions;
- `query`: filters, pages and stats over the tables; `api`: `/admin/requests`, `/admin/stats`;
  `cli`: `edgeroute logs` and `edgeroute stats`.
"""
