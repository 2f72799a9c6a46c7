"""The `learning.candidate_router:` config section. Imports nothing of edgeroute's."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CandidateRouter(BaseModel):
    """A router file evaluated in the shadow of the running one: for a sample of the requests
    a policy routes, the candidate's choice is computed off the request path and recorded
    (it never changes where a request goes). Needs the request log (the report reads it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    router_model: str  # a file from `edgeroute router train`, relative to the config file
    percent: float = Field(100.0, gt=0, le=100)  # share of policy-routed requests evaluated
