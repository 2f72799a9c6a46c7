"""The failover policy, driven directly: whatever the upstreams answer, it never retries a
client error, never exceeds the attempts allowed, never calls a deployment the decision's
rule excludes, and never lets the retry budget stop a first try on a healthy deployment."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeroute.config import Price
from edgeroute.dispatch.attempt import Failure
from edgeroute.dispatch.policy import FailoverPolicy, Settings, Stop, Try
from edgeroute.errors import ProxyError
from edgeroute.outcome import FALLBACK_ALIASES, Outcome
from edgeroute.upstream import DeploymentInfo

PRICE = Price(input_per_mtok=1.0, output_per_mtok=1.0)
FAILURES = [o for o in Outcome if o is not Outcome.SUCCESS]


def dep(i: int, context_window: int = 0) -> DeploymentInfo:
    return DeploymentInfo(i, f"d{i}", "m", "p", PRICE, context_window)


@dataclass
class World:
    order: list[DeploymentInfo]
    fallbacks: dict[str, list[DeploymentInfo]]
    allowed: set[int]  # fallback deployments the rule permits (the decision's order is permitted)
    open_: set[int]
    budget: list[bool]
    max_attempts: int
    answers: list[tuple[Outcome, int | None]]
    serving: bool
    full: set[int]


@st.composite
def worlds(draw: st.DrawFn) -> World:
    n = draw(st.integers(1, 5))
    order = [dep(i, draw(st.sampled_from([0, 1000, 8000]))) for i in range(n)]
    extra = [dep(n + i, draw(st.sampled_from([0, 1000, 8000, 128000]))) for i in range(draw(st.integers(0, 4)))]
    keys = draw(st.lists(st.sampled_from(["rate_limited", "server_error", "timeout", "context_window"]), unique=True))
    picks = st.lists(st.sampled_from(range(len(extra))), unique=True) if extra else st.just([])
    fallbacks = {k: [extra[i] for i in draw(picks)] for k in keys}
    everyone = [d.index for d in order + extra]
    return World(
        order=order,
        fallbacks=fallbacks,
        allowed=set(draw(st.lists(st.sampled_from([d.index for d in extra]), unique=True))) if extra else set(),
        open_=set(draw(st.lists(st.sampled_from(everyone), unique=True))),
        budget=draw(st.lists(st.booleans(), max_size=20)),
        max_attempts=draw(st.integers(1, 8)),
        answers=draw(
            st.lists(
                st.tuples(st.sampled_from(FAILURES), st.sampled_from([None, 400, 429, 500, 503])),
                min_size=1,
                max_size=20,
            )
        ),
        serving=draw(st.booleans()),
        full=set(draw(st.lists(st.sampled_from(everyone), unique=True))),
    )


def run(world: World) -> tuple[list[Try], list[Failure], Stop]:
    budget = list(world.budget)
    policy = FailoverPolicy(
        "m",
        [d.name for d in world.order],
        Settings(world.max_attempts, 0.0, 0.0, 0.0),
        fallbacks_on=world.fallbacks.get,
        allowed=lambda d: d.index in world.allowed or d in world.order,
        is_open=lambda i: i in world.open_,
        try_retry=lambda: budget.pop(0) if budget else False,
        remaining=lambda: 100.0,
        serving=lambda i: world.serving,
        is_full=lambda i: i in world.full,
        rng=random.Random(0),
    )
    state = policy.start(world.order)
    tries: list[Try] = []
    failures: list[Failure] = []
    step = policy.next_attempt(state, None)
    while isinstance(step, Try):
        assert len(tries) < 50, "the policy must stop"
        tries.append(step)
        outcome, status = world.answers[(len(tries) - 1) % len(world.answers)]
        f = Failure(outcome, status, f"failed with {outcome}")
        failures.append(f)
        step = policy.next_attempt(state, (step.deployment, f))
    return tries, failures, step


@settings(max_examples=400, deadline=None)
@given(worlds())
def test_the_policy_keeps_its_promises(world: World) -> None:
    tries, failures, stop = run(world)
    assert len(tries) <= world.max_attempts
    permitted = {d.index for d in world.order} | world.allowed
    assert all(t.deployment.index in permitted for t in tries)
    # A deployment at capacity is never called; with all of them full the answer is 429.
    assert all(t.deployment.index not in world.full for t in tries)
    if not tries:
        assert (stop.status, stop.error_class, stop.headers) == (429, "capacity", {"Retry-After": "1"})
        return
    # A client error is returned as it is, never tried elsewhere.
    for i, f in enumerate(failures[:-1]):
        assert f.outcome is not Outcome.CLIENT_ERROR, f"retried after a client error at attempt {i + 1}"
    if failures[-1].outcome is Outcome.CLIENT_ERROR:
        assert stop.status == (failures[-1].status or 400)
    # The error names exactly the deployments that were called.
    called = sorted({t.deployment.name for t in tries})
    assert (
        stop.poison
        or f"tried: {', '.join(called)}" in stop.reason
        or stop.error_class == "client_error"
        or (failures[-1].outcome in (Outcome.CONTENT_POLICY, Outcome.CONTEXT_WINDOW))
    )
    assert [t.kind for t in tries][:1] == ["first"]


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_an_empty_retry_budget_never_stops_a_first_try_on_a_healthy_deployment(world: World) -> None:
    world.budget = []
    world.answers = [(Outcome.SERVER_ERROR, 503)]
    world.fallbacks = {}
    world.full = set()
    tries, _, stop = run(world)
    healthy = [d for d in world.order if d.index not in world.open_ or d is world.order[0]]
    assert [t.deployment for t in tries] == healthy[: world.max_attempts]
    assert stop.status == 502


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_the_same_server_error_on_two_serving_deployments_is_poison(world: World) -> None:
    world.open_ = set()
    world.full = set()
    world.answers = [(Outcome.SERVER_ERROR, 500)]
    world.budget = [True] * 20
    tries, _, stop = run(world)
    distinct = len({t.deployment.index for t in tries})
    if world.serving and distinct >= 2:
        assert stop.poison and stop.status == 502 and distinct == 2
    else:
        assert not stop.poison


def test_rate_limited_replaces_rate_limit_and_the_old_spelling_still_reads() -> None:
    from edgeroute.config import Model

    m = Model(deployments=["d"], fallbacks_on={"rate_limit": ["x"], "timeout": ["y"]})
    assert m.fallbacks_on == {"rate_limited": ["x"], "timeout": ["y"]}
    assert FALLBACK_ALIASES["rate_limit"] == Outcome.RATE_LIMITED


def test_a_deployment_the_rule_excludes_is_never_a_fallback() -> None:
    order = [dep(0)]
    tagless = dep(1)
    policy = FailoverPolicy(
        "m",
        ["d0"],
        Settings(4, 0.0, 0.0, 0.0),
        fallbacks_on={"server_error": [tagless]}.get,
        allowed=lambda d: d is not tagless,
        is_open=lambda i: False,
        try_retry=lambda: True,
        remaining=lambda: 100.0,
        serving=lambda i: True,
    )
    state = policy.start(order)
    first = policy.next_attempt(state, None)
    assert isinstance(first, Try)
    # connect_error has no entry of its own: server_error's applies, and its deployment is excluded.
    step = policy.next_attempt(state, (first.deployment, Failure(Outcome.CONNECT_ERROR, None, "refused")))
    assert isinstance(step, Try) and step.deployment is order[0] and step.kind == "retry"


def _simple(order: list[DeploymentInfo], retries: list[bool]) -> FailoverPolicy:
    """A policy for `order` whose retries are all granted, and noted in `retries`."""

    def retry() -> bool:
        retries.append(True)
        return True

    return FailoverPolicy(
        "m",
        [d.name for d in order],
        Settings(2, 0.0, 0.0, 0.0),
        fallbacks_on=lambda key: None,
        allowed=lambda d: True,
        is_open=lambda i: False,
        try_retry=retry,
        remaining=lambda: 100.0,
        serving=lambda i: True,
        rng=random.Random(7),
    )


def test_a_deployment_that_cannot_read_the_request_is_no_attempt() -> None:
    """Skipped before any call: not counted against `max_attempts`, never chosen again, no retry
    taken; with none left that can read it, the first refusal is the answer."""
    order = [dep(0), dep(1), dep(2)]
    retries: list[bool] = []
    policy = _simple(order, retries)
    state = policy.start(order)
    first = policy.next_attempt(state, None)
    assert isinstance(first, Try) and first.deployment == order[0]
    refusal = ProxyError(400, "`d0` cannot read it", code="unsupported_parameter", param="messages")
    policy.cannot_read(state, order[0], refusal, chosen=True)
    policy.cannot_read(state, order[2], ProxyError(400, "`d2` cannot read it"), chosen=False)
    again = policy.next_attempt(state, None)
    assert isinstance(again, Try) and again.deployment == order[1] and again.kind == "first"
    failed = Failure(Outcome.SERVER_ERROR, 500, "boom")
    stop = policy.next_attempt(state, (order[1], failed))  # d1 again after a round: d0 and d2 never
    assert isinstance(stop, Try) and stop.deployment == order[1]
    assert retries == [True]  # the one retry was d1's own

    alone = policy.start([order[0]])
    assert isinstance(policy.next_attempt(alone, None), Try)
    policy.cannot_read(alone, order[0], refusal, chosen=True)
    end = policy.next_attempt(alone, None)
    assert isinstance(end, Stop) and end.error() is refusal and end.error_class == "unsupported_parameter"


def test_the_first_choice_redrawn_by_weight_among_the_routes_own() -> None:
    """The core orders a route's deployments after its weighted first pick by weight: taking
    the next one when the first cannot read the request gave the heaviest all of its share."""
    order = [dep(0), dep(1), dep(2), dep(3)]  # d3: another model's (a fallback), never drawn
    weights = {"d0": 1, "d1": 3, "d2": 1, "d3": 100}
    policy = _simple(order, [])
    policy.own = ["d0", "d1", "d2"]
    firsts = []
    for _ in range(4000):
        state = policy.start(order)
        policy.cannot_read(state, order[0], ProxyError(400, "no"), chosen=False)
        policy.redraw_first(state, lambda d: weights[d.name])
        step = policy.next_attempt(state, None)
        assert isinstance(step, Try)
        firsts.append(step.deployment.name)
    share = firsts.count("d2") / len(firsts)
    assert set(firsts) == {"d1", "d2"} and 0.2 < share < 0.3  # 1 in 4 (seeded: never flaky)
