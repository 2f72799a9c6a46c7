"""The YAML config: schema, validation with precise errors, and the core's view of it.

Modules, bottom up (none imports a module listed after it):

- `prices`: catalogue price references resolved to concrete prices;
- `schema`: the pydantic models (strict: an unknown key is an error);
- `errors`: `ConfigError`;
- `tls`: TLS files checked to exist and load;
- `checks`: checks across sections (references, secrets, budgets, keys);
- `loader`: `load`/`parse` (`read_text`: a file's text): YAML, schema, checks, then the Rust core's own check.

Everything is re-exported here: import from `edgeroute.config`.
"""

from __future__ import annotations

from edgeroute.config.errors import ConfigError
from edgeroute.config.loader import load, loads, parse, read_text
from edgeroute.config.schema import (
    MAX_LIMIT_USD,
    Budget,
    BudgetAction,
    Budgets,
    Config,
    Deployment,
    Experiment,
    FallbackClass,
    Feedback,
    HealthCheck,
    HealthSettings,
    Hedge,
    Learning,
    Ledger,
    Limit,
    Model,
    Policy,
    PolicyCandidate,
    Price,
    PriceWindow,
    Provider,
    ProviderKind,
    RateLimits,
    Retry,
    RetryBudget,
    Rule,
    RuleThen,
    RuleWhen,
    Server,
    Shadow,
    SharedState,
    SharedStateLiveness,
    Strategy,
    TaskType,
    Timeouts,
    TimeWindow,
    Tls,
    Variant,
    VirtualKey,
)

__all__ = [
    "MAX_LIMIT_USD",
    "Budget",
    "BudgetAction",
    "Budgets",
    "Config",
    "ConfigError",
    "Deployment",
    "Experiment",
    "FallbackClass",
    "Feedback",
    "HealthCheck",
    "HealthSettings",
    "Hedge",
    "Learning",
    "Ledger",
    "Limit",
    "Model",
    "Policy",
    "PolicyCandidate",
    "Price",
    "PriceWindow",
    "Provider",
    "ProviderKind",
    "RateLimits",
    "Retry",
    "RetryBudget",
    "Rule",
    "RuleThen",
    "RuleWhen",
    "Server",
    "Shadow",
    "SharedState",
    "SharedStateLiveness",
    "Strategy",
    "TaskType",
    "TimeWindow",
    "Timeouts",
    "Tls",
    "Variant",
    "VirtualKey",
    "load",
    "loads",
    "parse",
    "read_text",
]
