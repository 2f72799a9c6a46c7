//! The one error type of the core. Each variant says whose fault it is, so that
//! callers (the Python binding, an embedding Rust service) can map it onto a
//! status code without parsing messages.

use thiserror::Error;

/// Everything that can go wrong inside the core.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// The request body is not what the API expects (the client's fault: 400).
    #[error("{0}")]
    BadRequest(String),
    /// A rule refuses this request (403), e.g. data that must not leave.
    #[error("{0}")]
    Forbidden(String),
    /// The client asked for a model that no route serves (404).
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    UnknownModel(String),
    /// A route exists but none of its deployments may serve this request (503).
    #[error("no deployment of `{model}` can serve this request: {reason}")]
    NoDeployment {
        /// The public model name that was asked for.
        model: String,
        /// Why every candidate was excluded.
        reason: String,
    },
    /// The request is longer than the context window of every deployment that may serve it
    /// (400, as OpenAI's `context_length_exceeded`: no retry, fallback or wait would help).
    #[error(
        "This model's maximum context length is {window} tokens. However, your request needs {needed} tokens. \
         Please reduce the length of the messages."
    )]
    ContextTooLong {
        /// The public model name that was asked for.
        model: String,
        /// The request's tokens (prompt and the completion asked for).
        needed: u32,
        /// The largest context window among the deployments that may serve it.
        window: u32,
    },
    /// The router configuration is invalid (raised only when compiling a config).
    #[error("invalid router config: {0}")]
    Config(String),
    /// A model file (`ERLM`) could not be decoded, or two models do not fit
    /// together (raised only when loading models).
    #[error("invalid model file: {0}")]
    ModelFile(String),
    /// A model was asked to predict without an input it needs (e.g. a router
    /// model trained on task probabilities, given none).
    #[error("model input missing: {0}")]
    ModelInput(String),
}

/// Shorthand for results of the core.
pub type Result<T> = std::result::Result<T, CoreError>;
