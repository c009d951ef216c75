//! What a Marketo call can end in, sorted by what the caller should do next (spec §7, §8).

/// A failed Marketo call, after the client's own immediate retries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarketoError {
    /// Network trouble, timeouts, HTTP 5xx, or a transient Marketo code (502, 604, 606, 608,
    /// 611, 615, 713, or 601/602 after one token refresh): reschedule the write.
    #[error("Marketo call failed and may succeed later ({code}): {message}")]
    Retryable { code: String, message: String },
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
    pub fn is_retryable(&self) -> bool {
        matches!(self, MarketoError::Retryable { .. })
    }

    pub fn is_configuration(&self) -> bool {
        matches!(self, MarketoError::Configuration { .. })
    }

    /// Marketo's code, or a short client-side label (`network`, `timeout`, `http_503` …).
    pub fn code(&self) -> &str {
        match self {
            MarketoError::Retryable { code, .. }
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
    Quota,
    Configuration,
    Reject,
}

pub(crate) fn classify(code: &str) -> CodeClass {
    match code {
        "601" | "602" => CodeClass::Token,
        // 604/608/611 are not documented as retryable but every surveyed client retries them
        // (§7); 614 is "usually temporary", 719 a lock wait.
        "500" | "502" | "604" | "606" | "608" | "611" | "614" | "615" | "713" | "719" => CodeClass::Retry,
        "607" => CodeClass::Quota,
        "1018" | "603" | "610" => CodeClass::Configuration,
        _ => CodeClass::Reject,
    }
}
