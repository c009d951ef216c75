//! Error chains: a failure keeps its cause (`#[source]`), and what is logged or stored as a
//! dead-letter reason is the whole chain ("error sending request: client error (Connect): tcp
//! connect error: Connection refused"), never only its top line, with credentials taken out.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// A cause kept beside a typed error that must stay `Clone` (a Marketo error is shared by every
/// write of a failed call). Compared by its text.
#[derive(Clone)]
pub struct Cause(Arc<dyn Error + Send + Sync>);

impl Cause {
    pub fn new(e: impl Error + Send + Sync + 'static) -> Cause {
        Cause(Arc::new(e))
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&chain(self))
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl Error for Cause {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for Cause {
    fn eq(&self, other: &Cause) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

impl Eq for Cause {}

/// The error and every cause under it, joined by ": ", redacted. A cause whose text the message
/// above it already ends with (thiserror's `"…: {0}"` over a `#[from]`) is not repeated.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let part = cause.to_string();
        if !part.is_empty() && !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = cause.source();
    }
    redact(&text)
}

/// Takes credentials out of text that may quote a URL: the user-info part of any URL
/// (`scheme://user:password@host`) and the values of secret-looking query parameters.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    // User info: between "://" and the next "@" that comes before any "/", space or ")".
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == ')' || c == '"')
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(i) => {
                out.push_str("[redacted]@");
                rest = &tail[i + 1..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    const SECRET_PARAMS: [&str; 6] = [
        "client_secret=",
        "access_token=",
        "code=",
        "password=",
        "secret=",
        "token=",
    ];
    for param in SECRET_PARAMS {
        let mut redacted = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(i) = rest.find(param) {
            // Only a whole parameter name (after ?, & or the start), not "refresh_token=" etc.
            let whole = i == 0 || matches!(rest.as_bytes()[i - 1], b'?' | b'&' | b' ' | b'(');
            let (head, tail) = rest.split_at(i + param.len());
            redacted.push_str(head);
            let end = tail
                .find(|c: char| c == '&' || c.is_whitespace() || c == ')' || c == '"')
                .unwrap_or(tail.len());
            if whole && end > 0 {
                redacted.push_str("[redacted]");
                rest = &tail[end..];
            } else {
                rest = tail;
            }
        }
        redacted.push_str(rest);
        out = redacted;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Outer(#[from] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn the_whole_chain_is_printed_once() {
        let e = Outer(Inner(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        )));
        assert_eq!(chain(&e), "outer: inner: Connection refused (os error 111)");
    }

    #[test]
    fn credentials_in_urls_and_secret_parameters_are_redacted() {
        assert_eq!(
            redact("connecting to postgres://app:hunter2@db:5432/oppsync failed"),
            "connecting to postgres://[redacted]@db:5432/oppsync failed"
        );
        assert_eq!(
            redact(
                "GET https://x.mktorest.com/identity/oauth/token?grant_type=client_credentials&client_id=abc&client_secret=s3cret failed"
            ),
            "GET https://x.mktorest.com/identity/oauth/token?grant_type=client_credentials&client_id=abc&client_secret=[redacted] failed"
        );
        assert_eq!(
            redact("POST /webhooks/dynamics?code=abc123"),
            "POST /webhooks/dynamics?code=[redacted]"
        );
        // Ordinary text is left alone.
        assert_eq!(redact("refresh_token=x is fine"), "refresh_token=x is fine");
        assert_eq!(redact("http://host/path@x"), "http://host/path@x");
    }
}
