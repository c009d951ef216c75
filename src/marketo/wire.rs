//! Marketo's JSON envelope, decoded leniently (spec §2.3): codes arrive as strings or numbers,
//! most members are optional, unknown members are ignored.

use serde::{Deserialize, Deserializer};
use serde_json::Value;

#[derive(Debug, Deserialize)]
pub(crate) struct Envelope {
    #[serde(rename = "requestId", default)]
    pub request_id: Option<String>,
    #[serde(default)]
    pub success: bool,
    #[serde(default)]
    pub result: Option<Vec<Value>>,
    #[serde(default)]
    pub errors: Option<Vec<Issue>>,
    #[serde(rename = "moreResult", default)]
    pub more_result: Option<bool>,
    #[serde(rename = "nextPageToken", default)]
    pub next_page_token: Option<String>,
}

impl Envelope {
    pub fn result(&mut self) -> Vec<Value> {
        self.result.take().unwrap_or_default()
    }

    pub fn errors(&self) -> &[Issue] {
        self.errors.as_deref().unwrap_or(&[])
    }
}

/// An entry of `errors`, `warnings` or `reasons`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Issue {
    #[serde(deserialize_with = "code_text")]
    pub code: String,
    #[serde(default)]
    pub message: String,
}

fn code_text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        Value::Number(n) => n.to_string(),
        Value::Null => String::new(),
        other => other.to_string(),
    })
}

/// One item of a write's `result`.
#[derive(Debug, Deserialize)]
pub(crate) struct RecordOutcome {
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(rename = "marketoGUID", default)]
    pub marketo_guid: Option<String>,
    #[serde(default)]
    pub id: Option<Value>,
    #[serde(default)]
    pub reasons: Option<Vec<Issue>>,
}

impl RecordOutcome {
    pub fn id_text(&self) -> Option<String> {
        if let Some(g) = &self.marketo_guid {
            return Some(g.clone());
        }
        match &self.id {
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        }
    }
}

/// Identity's answer: a token, or (HTTP 401) an OAuth-style error (§1.2, §1.4).
#[derive(Debug, Deserialize)]
pub(crate) struct TokenReply {
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<f64>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub error_description: Option<String>,
}
