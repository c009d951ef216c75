//! Scrape-cost benchmark: what `GET /metrics` (and `/admin/stats`) reads from the store, timed on
//! SQLite stores holding 10,000 and 1,000,000 rows in each of the inbox and the Marketo writes
//! (nearly all settled, as a long-running store is; a few hundred pending and dead). Prints the
//! median and the slowest of repeated reads, for `Store::stats` (counts kept by triggers, oldest
//! pending rows from partial indexes) and, for comparison, the `GROUP BY` over every row that
//! scrapes ran before.
//!
//! `cargo bench --bench scrape` (about a minute, most of it filling the million-row store; add
//! `-- --sizes 10000,100000` for other sizes).

use std::time::{Duration, Instant};

use oppsync::store::{Store, now_ms};

const PENDING: i64 = 300;
const DEAD: i64 = 20;
const RUNS: usize = 50;

fn sizes() -> Vec<i64> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--sizes")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 1_000_000])
}

/// Fills the inbox and the writes with `rows` rows each in one statement per table (the
/// triggers keep the counts as they would for rows arriving one by one).
async fn fill(pool: &sqlx::SqlitePool, rows: i64) -> anyhow::Result<()> {
    let now = now_ms();
    let status = format!(
        "CASE WHEN x <= {PENDING} THEN 'pending' WHEN x <= {} THEN 'dead' ELSE 'done' END",
        PENDING + DEAD
    );
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < {rows}) \
         INSERT INTO inbox (dedupe_key, received_at, entity, message, record_id, version, data_missing, \
         body, body_codec, status, attempts, next_attempt_at) \
         SELECT 'k' || x, {now} - x, 'opportunity', 'Update', 'r' || x, x, 0, x'7b7d', 'json', {status}, 0, {now} FROM g"
    )))
    .execute(pool)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < {rows}) \
         INSERT INTO marketo_writes (key, opportunity_id, phase, payload, revision, status, attempts, \
         next_attempt_at, updated_at) \
         SELECT 'opportunity:' || x, 'o' || x, 2, '{{}}', 1, {status}, 0, {now}, {now} - x FROM g"
    )))
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE").execute(pool).await?;
    Ok(())
}

/// The scrape's store read before counts were kept: every row grouped by status.
async fn group_by_every_row(pool: &sqlx::SqlitePool) -> anyhow::Result<()> {
    sqlx::query("SELECT status, COUNT(*) AS n, MIN(received_at) AS oldest FROM inbox GROUP BY status")
        .fetch_all(pool)
        .await?;
    sqlx::query(
        "SELECT status, COUNT(*) AS n, MIN(updated_at) AS oldest FROM marketo_writes GROUP BY status",
    )
    .fetch_all(pool)
    .await?;
    Ok(())
}

fn summary(mut times: Vec<Duration>) -> String {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "median {:>8.3} ms, slowest {:>8.3} ms",
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1])
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    println!("scrape cost: store reads of GET /metrics on SQLite, {RUNS} runs each");
    for rows in sizes() {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("scrape.db").display());
        let store = Store::connect(&url, 2).await?;
        store.migrate().await?;
        let Store::Sqlite(sqlite) = &store else {
            anyhow::bail!("expected SQLite");
        };
        let filled = Instant::now();
        fill(sqlite.pool(), rows).await?;
        let filling = filled.elapsed();
        let stats = store.stats(now_ms()).await?;
        anyhow::ensure!(
            stats.inbox_pending == PENDING
                && stats.writes_dead == DEAD
                && stats.inbox_done == rows - PENDING - DEAD,
            "the kept counts are off: {stats:?}"
        );
        let mut kept = Vec::with_capacity(RUNS);
        let mut grouped = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let t = Instant::now();
            std::hint::black_box(store.stats(now_ms()).await?);
            kept.push(t.elapsed());
            let t = Instant::now();
            group_by_every_row(sqlite.pool()).await?;
            grouped.push(t.elapsed());
        }
        println!(
            "{rows:>9} rows per table (filled in {:.1} s):\n    Store::stats (kept counts, partial indexes): {}\n    GROUP BY over every row (before):           {}",
            filling.as_secs_f64(),
            summary(kept),
            summary(grouped)
        );
    }
    Ok(())
}
