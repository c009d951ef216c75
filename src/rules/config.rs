//! `[sync]` configuration: which fields are synced and how, role names, lead matching.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {}

impl SyncConfig {
    /// Every problem of this section, each naming the offending entry.
    pub fn problems(&self) -> Vec<String> {
        Vec::new()
    }
}
