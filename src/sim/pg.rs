//! A scratch PostgreSQL database per test or harness run, created on the server named by
//! `OPPSYNC_TEST_PG_URL` (default: the local server's `test` database) and dropped afterwards.

use anyhow::Context;
use sqlx::Connection;
use sqlx::postgres::PgConnection;

pub fn admin_url() -> String {
    std::env::var("OPPSYNC_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> anyhow::Result<TestDatabase> {
        let admin = admin_url();
        let name = format!("oppsync_t_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin)
            .await
            .with_context(|| format!("PostgreSQL must be reachable at {admin} (OPPSYNC_TEST_PG_URL)"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
        let base = admin
            .rsplit_once('/')
            .map(|(b, _)| b.to_owned())
            .unwrap_or(admin.clone());
        Ok(TestDatabase {
            url: format!("{base}/{name}"),
            name,
        })
    }

    pub async fn drop_now(self) {
        if let Ok(mut conn) = PgConnection::connect(&admin_url()).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut conn)
            .await;
        }
    }
}
