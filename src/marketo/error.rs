//! What a Marketo call can end in, sorted by what the caller should do next (spec §7, §8).

use crate::errors::Cause;

/// A failed Marketo call, after the client's own immediate retries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarketoError {
    /// Network trouble, timeouts, HTTP 5xx, or a transient Marketo code (502, 611, 713, or
    /// 601/602 after one token refresh): reschedule the write; it counts as a failed attempt.
    /// `cause` keeps what the transport said (connection refused, DNS, TLS …).
    #[error("Marketo call failed and may succeed later ({code}): {message}")]
    Retryable {
        code: String,
        message: String,
        #[source]
        cause: Option<Cause>,
    },
    /// The instance asked everyone to slow down: 606 (rate limit), 615 (concurrency limit),
    /// 604 (timed out under load), 608 (temporarily unavailable), HTTP 429. Marketo instances
    /// are shared, so another integration's burst causes these: the whole pusher backs off and
    /// paces itself, and the write is rescheduled without counting an attempt.
    #[error("Marketo asked to slow down ({code}): {message}")]
    Throttled { code: String, message: String },
    /// 607: the instance's daily quota is used up. Wait for the reset at 00:00 CST.
    #[error("Marketo daily API quota is used up: {message}")]
    QuotaExhausted { message: String },
    /// The instance or the credentials are set up so that pushing cannot work: 1018 (native
    /// CRM sync enabled), 603 (access denied), 610, or bad client credentials. Stop pushing.
    #[error("Marketo configuration problem ({code}): {message}")]
    Configuration { code: String, message: String },
    /// Marketo refused the request itself (609, 612, 1003 …); resending it unchanged won't help.
    #[error("Marketo rejected the request ({code}): {message}")]
    Rejected { code: String, message: String },
}

impl MarketoError {
    /// Whether the same call may succeed if made again later (throttling included).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            MarketoError::Retryable { .. } | MarketoError::Throttled { .. }
        )
    }

    pub fn is_throttled(&self) -> bool {
        matches!(self, MarketoError::Throttled { .. })
    }

    /// A retryable error without a cause of its own.
    pub fn retryable(code: impl Into<String>, message: impl Into<String>) -> MarketoError {
        MarketoError::Retryable {
            code: code.into(),
            message: message.into(),
            cause: None,
        }
    }

    pub fn is_configuration(&self) -> bool {
        matches!(self, MarketoError::Configuration { .. })
    }

    /// Marketo's code, or a short client-side label (`network`, `timeout`, `http_503` …).
    pub fn code(&self) -> &str {
        match self {
            MarketoError::Retryable { code, .. }
            | MarketoError::Throttled { code, .. }
            | MarketoError::Configuration { code, .. }
            | MarketoError::Rejected { code, .. } => code,
            MarketoError::QuotaExhausted { .. } => "607",
        }
    }
}

/// How the client treats one response-level code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CodeClass {
    /// 601, 602: refresh the token once and retry with the new one.
    Token,
    Retry,
    /// The instance is busy (someone, maybe not us, exceeds its limits): slow down.
    Throttle,
    Quota,
    Configuration,
    Reject,
}

pub(crate) fn classify(code: &str) -> CodeClass {
    match code {
        "601" | "602" => CodeClass::Token,
        // 606 and 615 are the shared instance's rate and concurrency limits; 604 (timed out
        // under load) and 608 (temporarily unavailable) say the same thing: wait, the write is
        // fine (§7, I3).
        "604" | "606" | "608" | "615" => CodeClass::Throttle,
        // 611 (system error) is not documented as retryable but every surveyed client retries it
        // (§7); it may be the record's fault, so it counts as an attempt. 614 is "usually
        // temporary", 719 a lock wait.
        "500" | "502" | "611" | "614" | "713" | "719" => CodeClass::Retry,
        "607" => CodeClass::Quota,
        "1018" | "603" | "610" => CodeClass::Configuration,
        _ => CodeClass::Reject,
    }
}
