"""Shadow evaluation of a candidate router on live traffic, before it is switched on.

- `settings`: the `learning.candidate_router:` config section;
- `evaluator`: for each policy-routed request, the candidate's choice, computed off the
  request path and recorded beside the request log (`requestlog.outcomes`);
- `report`: the cost-quality difference of the candidate's choices against the running
  router's (`GET /admin/router/shadow`, `edgeroute router shadow`).
"""
