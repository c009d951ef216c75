//! Process lifecycle flags shared by the server, the worker and the probes.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::RwLock;

/// Process lifecycle flags shared by the server, the worker and the probes.
#[derive(Debug, Default)]
pub struct Lifecycle {
    draining: AtomicBool,
    pushing: AtomicBool,
    marketo_problem: RwLock<Option<String>>,
}

impl Lifecycle {
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

    /// A Marketo configuration error (e.g. 1018 native CRM sync enabled) stops pushing and
    /// turns readiness red until it clears.
    pub fn set_marketo_problem(&self, problem: Option<String>) {
        *self.marketo_problem.write() = problem;
    }

    pub fn marketo_problem(&self) -> Option<String> {
        self.marketo_problem.read().clone()
    }
}
