//! The day's Marketo call count, kept in the store: a restart (or a crash loop, or a new
//! replica taking the push lease) goes on from the count the day has reached instead of zero,
//! so it cannot spend the instance's daily quota twice. The count is saved at most once a
//! second while calls are made, and when the pusher stops; a crash loses at most that second.

use std::time::{Duration, Instant};

use super::WorkerContext;
use crate::marketo::QuotaDay;

/// The store control key.
const KEY: &str = "marketo_quota_day";
/// Most often a changing count is written.
const EVERY: Duration = Duration::from_secs(1);

/// Takes back the count an earlier process kept for today (nothing on another day).
pub async fn restore(ctx: &WorkerContext) {
    match ctx.store.control(KEY).await {
        Ok(Some(text)) => match serde_json::from_str::<QuotaDay>(&text) {
            Ok(kept) => {
                ctx.marketo.restore_quota_day(kept);
                let now = ctx.marketo.quota_day();
                if kept.day == now.day {
                    tracing::info!(used = now.used, "Marketo calls used today, as kept in the store");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the kept Marketo quota count is unreadable; counting from this process's calls")
            }
        },
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %crate::errors::chain(&e), "could not read the kept Marketo quota count")
        }
    }
}

/// Writes the day's count when it changed, at most once per [`EVERY`] unless `now`.
#[derive(Default)]
pub struct QuotaKeeper {
    saved: Option<QuotaDay>,
    at: Option<Instant>,
}

impl QuotaKeeper {
    pub async fn save(&mut self, ctx: &WorkerContext, now: bool) {
        let current = ctx.marketo.quota_day();
        if self.saved == Some(current) || (!now && self.at.is_some_and(|at| at.elapsed() < EVERY)) {
            return;
        }
        let text = match serde_json::to_string(&current) {
            Ok(t) => t,
            Err(e) => return tracing::warn!(error = %e, "could not encode the Marketo quota count"),
        };
        match ctx.store.set_control(KEY, &text).await {
            Ok(()) => {
                self.saved = Some(current);
                self.at = Some(Instant::now());
            }
            Err(e) => {
                tracing::warn!(error = %crate::errors::chain(&e), "could not keep the Marketo quota count")
            }
        }
    }
}
