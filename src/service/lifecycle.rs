//! Process lifecycle flags shared by the server, the worker and the probes, and what blocks the
//! sync from outside (a Marketo or Dataverse setting).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::RwLock;
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::now_ms;

/// An outside system whose configuration can stop the sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum System {
    Marketo,
    Dataverse,
}

impl System {
    pub fn as_str(self) -> &'static str {
        match self {
            System::Marketo => "marketo",
            System::Dataverse => "dataverse",
        }
    }
}

/// Why the sync cannot work until someone changes a setting. Not a failure of any record:
/// nothing is dead-lettered, writes wait and are probed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BlockReason {
    /// Marketo 1018: native CRM sync is enabled on the instance, which then refuses
    /// opportunity, role and company writes from the API.
    CrmSyncEnabled,
    /// The client id or secret is refused (Marketo identity, the Dataverse token endpoint).
    BadCredentials,
    /// Credentials accepted but not allowed (Marketo 603, HTTP 403; a disabled or revoked
    /// Dataverse application user).
    AccessDenied,
    /// Any other configuration problem (Marketo 610, a wrong base URL …).
    Misconfigured,
}

impl BlockReason {
    pub const ALL: [BlockReason; 4] = [
        BlockReason::CrmSyncEnabled,
        BlockReason::BadCredentials,
        BlockReason::AccessDenied,
        BlockReason::Misconfigured,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BlockReason::CrmSyncEnabled => "crm_sync_enabled",
            BlockReason::BadCredentials => "bad_credentials",
            BlockReason::AccessDenied => "access_denied",
            BlockReason::Misconfigured => "misconfigured",
        }
    }
}

/// A system blocking the sync: why, what it said, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Blocked {
    pub system: System,
    pub reason: BlockReason,
    /// What the system answered, e.g. Marketo's 1018 message.
    pub message: String,
    /// When this block started (milliseconds since the epoch).
    pub since: i64,
}

/// Process lifecycle flags shared by the server, the worker and the probes.
#[derive(Debug, Default)]
pub struct Lifecycle {
    draining: AtomicBool,
    pushing: AtomicBool,
    worker_gone: AtomicBool,
    blocked: RwLock<BTreeMap<System, Blocked>>,
    /// What the last readiness check answered: 0 not asked yet, 1 ready, 2 not ready.
    readiness: std::sync::atomic::AtomicU8,
    /// Poked by intake when it stored a notification, so this process's planner starts on it
    /// at once instead of at its next poll (other replicas still poll).
    stored: tokio::sync::Notify,
}

impl Lifecycle {
    /// Intake stored a notification.
    pub fn notify_stored(&self) {
        self.stored.notify_one();
    }

    /// Returns once intake stored a notification (at once if it did since the last call).
    pub async fn notification_stored(&self) {
        self.stored.notified().await;
    }

    /// Records a readiness answer; true when it differs from the last one, so that a probe
    /// every few seconds logs a change once, not every answer.
    pub fn readiness_changed(&self, ready: bool) -> bool {
        let now = if ready { 1 } else { 2 };
        self.readiness.swap(now, Ordering::SeqCst) != now
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Whether this replica currently holds the push lease.
    pub fn set_pushing(&self, pushing: bool) {
        self.pushing.store(pushing, Ordering::SeqCst);
    }

    pub fn is_pushing(&self) -> bool {
        self.pushing.load(Ordering::SeqCst)
    }

    /// A worker loop kept failing and was given up: liveness fails so the pod is restarted.
    pub fn set_worker_gone(&self) {
        self.worker_gone.store(true, Ordering::SeqCst);
    }

    pub fn is_worker_gone(&self) -> bool {
        self.worker_gone.load(Ordering::SeqCst)
    }

    /// Records whether `system` blocks the sync (None: it works again). Readiness never depends
    /// on it: intake goes on. An error is logged once per change of state or reason, not per
    /// refused call; `since` keeps the start of the block while the reason stays the same.
    pub fn set_blocked(&self, system: System, blocked: Option<(BlockReason, String)>) {
        // Most calls confirm the current state: a read lock is enough to see that.
        {
            let current = self.blocked.read();
            let same = match (current.get(&system), &blocked) {
                (None, None) => true,
                (Some(b), Some((reason, message))) => b.reason == *reason && b.message == *message,
                _ => false,
            };
            if same {
                return;
            }
        }
        let mut map = self.blocked.write();
        match blocked {
            None => {
                if let Some(was) = map.remove(&system) {
                    tracing::info!(
                        system = system.as_str(),
                        was = was.reason.as_str(),
                        blocked_for_secs = (now_ms() - was.since) / 1000,
                        "{} no longer blocks the sync",
                        system.as_str()
                    );
                }
            }
            Some((reason, message)) => {
                let previous = map.get(&system).cloned();
                let changed = previous.as_ref().map(|p| p.reason) != Some(reason);
                let since = match &previous {
                    Some(p) if !changed => p.since,
                    _ => now_ms(),
                };
                if changed {
                    tracing::error!(
                        system = system.as_str(),
                        reason = reason.as_str(),
                        error = %message,
                        "{} blocks the sync until its configuration is fixed; intake goes on and nothing is dropped",
                        system.as_str()
                    );
                }
                map.insert(
                    system,
                    Blocked {
                        system,
                        reason,
                        message,
                        since,
                    },
                );
            }
        }
        drop(map);
        self.export_blocked();
    }

    /// Every block in force, Marketo first.
    pub fn blocked(&self) -> Vec<Blocked> {
        self.blocked.read().values().cloned().collect()
    }

    /// Sets `oppsync_marketo_blocked{reason}` and `oppsync_dataverse_blocked{reason}`: 1 for
    /// the reason in force, 0 for every other, so an alert sees a series before anything
    /// happened.
    pub fn export_blocked(&self) {
        let map = self.blocked.read();
        for system in [System::Marketo, System::Dataverse] {
            let current = map.get(&system).map(|b| b.reason);
            for reason in BlockReason::ALL {
                let value = if current == Some(reason) { 1.0 } else { 0.0 };
                match system {
                    System::Marketo => {
                        metrics::gauge!("oppsync_marketo_blocked", "reason" => reason.as_str()).set(value)
                    }
                    System::Dataverse => {
                        metrics::gauge!("oppsync_dataverse_blocked", "reason" => reason.as_str()).set(value)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_keeps_its_start_while_its_reason_stays_and_clears() {
        let l = Lifecycle::default();
        assert!(l.blocked().is_empty());
        l.set_blocked(
            System::Marketo,
            Some((BlockReason::CrmSyncEnabled, "CRM Enabled".into())),
        );
        let first = l.blocked();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].reason, BlockReason::CrmSyncEnabled);
        std::thread::sleep(std::time::Duration::from_millis(5));
        l.set_blocked(
            System::Marketo,
            Some((BlockReason::CrmSyncEnabled, "CRM Enabled again".into())),
        );
        assert_eq!(l.blocked()[0].since, first[0].since, "same reason, same block");
        assert_eq!(l.blocked()[0].message, "CRM Enabled again");
        l.set_blocked(System::Marketo, None);
        assert!(l.blocked().is_empty());
    }
}
