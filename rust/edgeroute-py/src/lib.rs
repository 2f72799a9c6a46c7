//! Python binding of edgeroute-core, imported as `edgeroute._core`.
//!
//! Shims only: convert arguments, release the GIL around core work, map the
//! core's error onto the exception hierarchy below. No routing logic lives here.

use std::collections::HashMap;
use std::sync::Arc;

use edgeroute_core as core;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

pyo3::create_exception!(
    edgeroute._core,
    EdgerouteError,
    pyo3::exceptions::PyException,
    "Base of every error raised by the core."
);
pyo3::create_exception!(
    edgeroute._core,
    BadRequestError,
    EdgerouteError,
    "The request body is invalid (HTTP 400)."
);
pyo3::create_exception!(
    edgeroute._core,
    ContextLengthError,
    BadRequestError,
    "The request is longer than every context window that may serve it (HTTP 400)."
);
pyo3::create_exception!(
    edgeroute._core,
    ForbiddenError,
    EdgerouteError,
    "A rule refuses this request (HTTP 403)."
);
pyo3::create_exception!(
    edgeroute._core,
    UnknownModelError,
    EdgerouteError,
    "No route serves the requested model (HTTP 404)."
);
pyo3::create_exception!(
    edgeroute._core,
    NoDeploymentError,
    EdgerouteError,
    "No deployment may serve this request (HTTP 503)."
);
pyo3::create_exception!(
    edgeroute._core,
    ConfigError,
    EdgerouteError,
    "The router config is invalid."
);

fn to_py(e: core::CoreError) -> PyErr {
    let msg = e.to_string();
    match e {
        core::CoreError::BadRequest(_) => BadRequestError::new_err(msg),
        core::CoreError::Forbidden(_) => ForbiddenError::new_err(msg),
        core::CoreError::UnknownModel(_) => UnknownModelError::new_err(msg),
        core::CoreError::NoDeployment { .. } => NoDeploymentError::new_err(msg),
        core::CoreError::ContextTooLong { .. } => ContextLengthError::new_err(msg),
        core::CoreError::Config(_) | core::CoreError::ModelFile(_) | core::CoreError::ModelInput(_) => {
            ConfigError::new_err(msg)
        }
    }
}

/// A routing decision (read-only).
///
/// The handlers read `route` and friends many times a request: the text fields are made
/// Python strings once, with the decision, and every read shares them.
#[pyclass(frozen, module = "edgeroute._core")]
struct Decision {
    inner: core::Decision,
    #[pyo3(get)]
    model: Py<PyString>,
    #[pyo3(get)]
    route: Py<PyString>,
    #[pyo3(get)]
    rule: Option<Py<PyString>>,
    reasons: Py<PyTuple>,
    #[pyo3(get)]
    encoding: Py<PyString>,
    #[pyo3(get)]
    task: Option<Py<PyString>>,
    #[pyo3(get)]
    policy: Option<Py<PyString>>,
    #[pyo3(get)]
    variant: Option<Py<PyString>>,
}

impl Decision {
    fn new(py: Python<'_>, inner: core::Decision) -> PyResult<Self> {
        let text = |s: &str| PyString::new(py, s).unbind();
        Ok(Decision {
            model: text(&inner.model),
            route: text(&inner.route),
            rule: inner.rule.as_deref().map(text),
            reasons: PyTuple::new(py, &inner.reasons)?.unbind(),
            encoding: text(inner.encoding),
            task: inner.task.map(text),
            policy: inner.policy.as_deref().map(text),
            variant: inner.variant.as_deref().map(text),
            inner,
        })
    }
}

#[pymethods]
impl Decision {
    #[getter]
    fn reasons<'py>(&self, py: Python<'py>) -> Bound<'py, PyList> {
        self.reasons.bind(py).to_list() // the caller's own list (it may keep or change it)
    }
    #[getter]
    fn order(&self) -> Vec<usize> {
        self.inner.order.clone()
    }
    #[getter]
    fn prompt_tokens(&self) -> u32 {
        self.inner.prompt_tokens
    }
    #[getter]
    fn tokens_exact(&self) -> bool {
        self.inner.tokens_exact
    }
    #[getter]
    fn stream(&self) -> bool {
        self.inner.stream
    }
    #[getter]
    fn include_usage(&self) -> bool {
        self.inner.include_usage
    }
    #[getter]
    fn service_tier(&self) -> Option<&str> {
        self.inner.service_tier.as_deref()
    }
    #[getter]
    fn max_tokens(&self) -> Option<u32> {
        self.inner.max_tokens
    }
    #[getter]
    fn choices(&self) -> u32 {
        self.inner.choices
    }
    #[getter]
    fn other_parts(&self) -> u32 {
        self.inner.other_parts
    }
    #[getter]
    fn prediction(&self) -> Option<&str> {
        self.inner.prediction.as_deref()
    }
    #[getter]
    fn model_span(&self) -> (usize, usize) {
        self.inner.model_span
    }
    #[getter]
    fn hedge_after_ms(&self) -> Option<f64> {
        self.inner.hedge_after_ms
    }
    #[getter]
    fn strategy(&self) -> &'static str {
        self.inner.strategy.name()
    }
    #[getter]
    fn task_confidence(&self) -> Option<f64> {
        self.inner.task_confidence
    }
    #[getter]
    fn difficulty(&self) -> Option<f64> {
        self.inner.difficulty
    }
    #[getter]
    fn scores(&self) -> Vec<(String, f64)> {
        self.inner.scores.clone()
    }
    #[getter]
    fn priority(&self) -> usize {
        self.inner.priority
    }
    #[getter]
    fn spilled(&self) -> Vec<usize> {
        self.inner.spilled.clone()
    }
    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}

/// A compiled router. Immutable: `reload` returns a new one that keeps health state.
#[pyclass(frozen, module = "edgeroute._core")]
struct Router {
    inner: Arc<core::Router>,
}

fn parse_spec(config_json: &[u8]) -> PyResult<core::RouterSpec> {
    serde_json_spec(config_json).map_err(|e| ConfigError::new_err(e.to_string()))
}

fn serde_json_spec(b: &[u8]) -> Result<core::RouterSpec, core::CoreError> {
    core::Router::spec_from_json(b)
}

fn classifier(task: Option<&[u8]>, router: Option<&[u8]>) -> PyResult<Option<core::classify::Classifier>> {
    match (task, router) {
        (Some(t), Some(r)) => core::classify::Classifier::from_bytes(t, r)
            .map(Some)
            .map_err(|e| ConfigError::new_err(format!("cannot load the routing models: {e}"))),
        (None, None) => Ok(None),
        _ => Err(ConfigError::new_err(
            "give both task_model and router_model, or neither",
        )),
    }
}

fn outcome(kind: &str, retry_after_ms: Option<u64>) -> PyResult<core::Outcome> {
    core::Outcome::from_name(kind, retry_after_ms)
        .ok_or_else(|| PyValueError::new_err(format!("unknown outcome {kind:?}")))
}

/// Inputs at least this long are worked on with the GIL released. A shorter one takes
/// microseconds, and its caller is the event loop, which waits for the answer either way:
/// releasing the GIL there only hands it to another thread (the ledger writer), which the loop
/// must then wait out, a GIL round trip of two context switches per call (about a tenth of a
/// proxied request's CPU). Python decides and counts a body longer than this in a worker thread
/// (`edgeroute.dispatch.attempt.COUNT_ON_LOOP_BYTES` and `DECIDE_ON_LOOP_BYTES` are not below
/// it), where the GIL must be released.
pub const DETACH_FROM_BYTES: usize = 16 * 1024;

/// Runs `f` with the GIL released when its input is `len` bytes or more (see `DETACH_FROM_BYTES`).
fn detached_if_long<T: Send>(py: Python<'_>, len: usize, f: impl FnOnce() -> T + Send) -> T {
    if len < DETACH_FROM_BYTES {
        f()
    } else {
        py.detach(f)
    }
}

/// `text` with each occurrence of personal data replaced by `[PII:<kind>]`.
#[pyfunction]
fn redact_pii(py: Python<'_>, text: &str) -> String {
    // Always released: its callers are the ledger writer's thread, whose turn the loop waits
    // for, and the rare error text.
    py.detach(|| core::pii::redact(text).into_owned())
}

#[pymethods]
impl Router {
    #[new]
    #[pyo3(signature = (config_json, task_model=None, router_model=None))]
    fn new(
        py: Python<'_>,
        config_json: &[u8],
        task_model: Option<&[u8]>,
        router_model: Option<&[u8]>,
    ) -> PyResult<Self> {
        let spec = parse_spec(config_json)?;
        let clf = classifier(task_model, router_model)?;
        let router = py.detach(|| {
            let r = match clf {
                Some(c) => core::Router::with_classifier(spec, c)?,
                None => core::Router::new(spec)?,
            };
            Ok::<_, core::CoreError>(r)
        });
        Ok(Self {
            inner: Arc::new(router.map_err(to_py)?),
        })
    }

    /// A router for a new config that keeps this one's health state; the
    /// classification models are replaced when both are given, kept otherwise.
    #[pyo3(signature = (config_json, task_model=None, router_model=None))]
    fn reload(
        &self,
        py: Python<'_>,
        config_json: &[u8],
        task_model: Option<&[u8]>,
        router_model: Option<&[u8]>,
    ) -> PyResult<Self> {
        let spec = parse_spec(config_json)?;
        let clf = classifier(task_model, router_model)?;
        let router = py
            .detach(|| match clf {
                Some(c) => self.inner.reload_with_classifier(spec, Some(c)),
                None => self.inner.reload(spec),
            })
            .map_err(to_py)?;
        Ok(Self {
            inner: Arc::new(router),
        })
    }

    /// Scales deployment `index`'s prices by `multiplier` (a time-of-day price window).
    fn set_price_multiplier(&self, index: usize, multiplier: f64) -> PyResult<()> {
        self.checked(index)?;
        self.inner.set_price_multiplier(index, multiplier);
        Ok(())
    }

    /// Replaces the feedback-learning shifts: {(task, route): shift}, and per team
    /// {team: {(task, route): shift}} for that team's requests.
    #[pyo3(signature = (shifts, teams=None))]
    fn set_shifts(&self, shifts: core::policy::FlatShifts, teams: Option<HashMap<String, core::policy::FlatShifts>>) {
        self.inner.set_shifts(shifts, teams.unwrap_or_default());
    }

    /// Exact prompt tokens of a chat body (for accounting when a decision only estimated them).
    fn count_prompt(&self, py: Python<'_>, body: &[u8]) -> PyResult<u32> {
        detached_if_long(py, body.len(), || self.inner.count_prompt(body)).map_err(to_py)
    }

    /// Builds the tokenizer lookup tables of every deployment's encoding now (~14 MB and
    /// tens of ms each), so that the first exact count does not pay for it.
    fn warm_up(&self, py: Python<'_>) {
        py.detach(|| self.inner.warm_up());
    }

    #[getter]
    fn has_classifier(&self) -> bool {
        self.inner.has_classifier()
    }

    #[pyo3(signature = (body, tags=None, team=None, role=None, user=None, prompt_tokens=None, key=None, explain=false, exact_tokens=false, priority=None, priority_ceiling=None, sticky=None))]
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        py: Python<'_>,
        body: &[u8],
        tags: Option<Vec<String>>,
        team: Option<String>,
        role: Option<String>,
        user: Option<String>,
        prompt_tokens: Option<u32>,
        key: Option<String>,
        explain: bool,
        exact_tokens: bool,
        priority: Option<String>,
        priority_ceiling: Option<String>,
        sticky: Option<String>,
    ) -> PyResult<Decision> {
        let meta = core::RequestMeta {
            tags: tags.unwrap_or_default(),
            team,
            role,
            user,
            prompt_tokens,
            key,
            sticky,
            explain,
            exact_tokens,
            priority,
            priority_ceiling,
        };
        let inner = detached_if_long(py, body.len(), || self.inner.decide(body, &meta)).map_err(to_py)?;
        Decision::new(py, inner)
    }

    /// The body with its `model` value replaced by deployment `index`'s upstream model.
    fn body_for<'py>(
        &self,
        py: Python<'py>,
        body: &[u8],
        decision: &Decision,
        index: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let model = &self.checked(index)?.model;
        let (head, quoted, tail) = core::model_parts(body, decision.inner.model_span, model);
        let (a, b) = (head.len(), head.len() + quoted.len());
        PyBytes::new_with(py, b + tail.len(), |out| {
            out[..a].copy_from_slice(head);
            out[a..b].copy_from_slice(quoted.as_bytes());
            out[b..].copy_from_slice(tail);
            Ok(())
        })
    }

    /// Takes a capacity slot on deployment `index`.
    fn acquire(&self, index: usize) -> PyResult<()> {
        self.checked(index)?;
        self.inner.acquire(index);
        Ok(())
    }

    /// Gives back a capacity slot on deployment `index`.
    fn release(&self, index: usize) -> PyResult<()> {
        self.checked(index)?;
        self.inner.release(index);
        Ok(())
    }

    fn has_room(&self, index: usize, priority: usize) -> PyResult<bool> {
        self.checked(index)?;
        Ok(self.inner.has_room(index, priority))
    }

    fn slots(&self, index: usize) -> PyResult<(u32, Option<u32>)> {
        self.checked(index)?;
        Ok(self.inner.slots(index))
    }

    fn priority_classes(&self) -> Vec<String> {
        self.inner.priority_classes().to_vec()
    }

    #[pyo3(signature = (index, sender=0))]
    fn begin(&self, index: usize, sender: u64) -> PyResult<()> {
        self.checked(index)?;
        self.inner.begin_for(index, sender);
        Ok(())
    }

    /// Whether some deployment may be ejected for a sender alone (else none need be asked).
    fn any_sender_ejection(&self) -> bool {
        self.inner.any_sender_ejection()
    }

    /// Whether deployment `index` is ejected for `sender` alone (its requests skip it).
    fn ejected_for(&self, index: usize, sender: u64) -> PyResult<bool> {
        self.checked(index)?;
        Ok(self.inner.ejected_for(index, sender))
    }

    #[pyo3(signature = (index, outcome_kind, latency_ms, retry_after_ms=None, sender=0))]
    fn report(
        &self,
        index: usize,
        outcome_kind: &str,
        latency_ms: f64,
        retry_after_ms: Option<u64>,
        sender: u64,
    ) -> PyResult<Option<u64>> {
        self.checked(index)?;
        let outcome = outcome(outcome_kind, retry_after_ms)?;
        Ok(self.inner.report(index, outcome, latency_ms, sender))
    }

    fn hold_for_limit(&self, index: usize, ms: u64) -> PyResult<()> {
        self.checked(index)?;
        self.inner.hold_for_limit(index, ms);
        Ok(())
    }

    fn end_limit_hold(&self, index: usize) -> PyResult<()> {
        self.checked(index)?;
        self.inner.end_limit_hold(index);
        Ok(())
    }

    #[pyo3(signature = (index, sender=0))]
    fn report_broken_stream(&self, index: usize, sender: u64) -> PyResult<Option<u64>> {
        self.checked(index)?;
        Ok(self.inner.report_broken_stream(index, sender))
    }

    #[pyo3(signature = (index, elapsed_ms, answering, sender=0))]
    fn report_lost_race(&self, index: usize, elapsed_ms: f64, answering: bool, sender: u64) -> PyResult<Option<u64>> {
        self.checked(index)?;
        Ok(self.inner.report_lost_race(index, elapsed_ms, answering, sender))
    }

    fn fund_budgets(&self, route: &str) {
        self.inner.fund_budgets(route);
    }

    fn try_retry(&self, route: &str) -> bool {
        self.inner.try_retry(route)
    }

    fn try_hedge(&self, route: &str) -> bool {
        self.inner.try_hedge(route)
    }

    fn set_probe_result(&self, index: usize, healthy: bool, eject_ms: u64) -> PyResult<()> {
        self.checked(index)?;
        self.inner.set_probe_result(index, healthy, eject_ms);
        Ok(())
    }

    /// Whether deployment `index` serves this process's traffic well now: enough recent
    /// requests, failing at under half the failure rate (a shared circuit is not applied then).
    fn serving_well(&self, index: usize) -> PyResult<bool> {
        self.checked(index)?;
        Ok(self.inner.serving_well(index))
    }

    fn health<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Bound<'py, PyDict>> {
        self.checked(index)?;
        let h = self.inner.health(index);
        let d = PyDict::new(py);
        d.set_item("circuit", h.circuit.name())?;
        d.set_item("latency_ms", h.latency_ms)?;
        d.set_item("error_rate", h.error_rate)?;
        d.set_item("consecutive_failures", h.consecutive_failures)?;
        d.set_item("in_flight", h.in_flight)?;
        d.set_item("cooldown_ms", h.cooldown_ms)?;
        d.set_item("limit_hold_ms", h.limit_hold_ms)?;
        d.set_item("requests", h.requests)?;
        d.set_item("failures", h.failures)?;
        d.set_item("sender_ejections", h.sender_ejections)?;
        d.set_item("senders_ejected", h.senders_ejected)?;
        Ok(d)
    }

    fn deployment_names(&self) -> Vec<String> {
        (0..self.inner.deployment_count())
            .map(|i| self.inner.deployment(i).name.clone())
            .collect()
    }

    fn model_names(&self) -> Vec<String> {
        self.inner.model_names().map(str::to_owned).collect()
    }

    #[staticmethod]
    fn count_tokens(py: Python<'_>, text: &str, encoding: &str) -> PyResult<usize> {
        detached_if_long(py, text.len(), || core::Router::count_tokens(text, encoding)).map_err(to_py)
    }

    /// Whether the JSON in `body` nests arrays and objects more than `limit` deep (a byte scan).
    #[staticmethod]
    fn nesting_over(py: Python<'_>, body: &[u8], limit: usize) -> bool {
        detached_if_long(py, body.len(), || core::nesting_over(body, limit))
    }

    /// The path of the first key the JSON in `body` repeats within one object (a byte scan).
    #[staticmethod]
    fn duplicate_key(py: Python<'_>, body: &[u8]) -> Option<String> {
        detached_if_long(py, body.len(), || core::duplicate_key(body))
    }

    /// Whether `body` nests more than `limit` deep, else the first key it repeats (a body
    /// found clean is remembered: the same bytes again are compared, not scanned).
    #[staticmethod]
    fn body_faults(py: Python<'_>, body: &[u8], limit: usize) -> (bool, Option<String>) {
        detached_if_long(py, body.len(), || core::body_faults(body, limit))
    }
}

impl Router {
    fn checked(&self, index: usize) -> PyResult<&core::DeploymentSpec> {
        if index < self.inner.deployment_count() {
            Ok(self.inner.deployment(index))
        } else {
            Err(PyValueError::new_err(format!("no deployment with index {index}")))
        }
    }
}

#[pymodule]
mod _core {
    #[pymodule_export]
    use super::{
        redact_pii, BadRequestError, ConfigError, ContextLengthError, Decision, EdgerouteError, ForbiddenError,
        NoDeploymentError, Router, UnknownModelError,
    };

    #[pymodule_init]
    fn init(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        use pyo3::types::PyModuleMethods;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add("DETACH_FROM_BYTES", super::DETACH_FROM_BYTES)?;
        m.add(
            "OUTCOMES",
            pyo3::types::PyTuple::new(m.py(), edgeroute_core::Outcome::NAMES)?,
        )
    }
}
