//! Paged collection reads: one page at a time (`Prefer: odata.maxpagesize`, `@odata.nextLink`),
//! so a caller can stream an organisation of any size without holding it, and keep the link of
//! the next page as a resumable cursor. With change tracking (`Prefer: odata.track-changes`) the
//! last page carries an `@odata.deltaLink`, and reading that link later returns what changed
//! since, deleted rows as `$deletedEntity` entries (specs/dynamics.md, addendum).

use reqwest::Method;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::value::RawValue;
use url::Url;
use uuid::Uuid;

use super::{
    CONNECTION_COLUMNS, CONTACT_COLUMNS, DataverseClient, RowRecord, WebApiError, convert_row, modified_on,
    odata_error, opportunity_select, parse_object,
};

/// The error code of a change-tracking request on a table that has it off [I: the message,
/// "… is not enabled for change tracking", is matched too].
pub const CHANGE_TRACKING_OFF_CODE: &str = "0x80044800";

/// Dataverse answers at most this many rows a page, whatever is asked.
pub const MAX_PAGE_SIZE: u32 = 5000;

/// A collection read to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionQuery {
    pub entity_set: String,
    /// The primary key column (`opportunityid`), which every row carries.
    pub primary_key: String,
    pub select: String,
    pub filter: Option<String>,
    pub page_size: u32,
    /// Ask for the total (`$count=true`) with the first page.
    pub count: bool,
    /// Ask for a delta link (`Prefer: odata.track-changes`); no `$filter` then.
    pub track_changes: bool,
}

impl CollectionQuery {
    fn new(entity_set: &str, primary_key: &str, select: String, page_size: u32) -> Self {
        CollectionQuery {
            entity_set: entity_set.to_owned(),
            primary_key: primary_key.to_owned(),
            select,
            filter: None,
            page_size: page_size.clamp(1, MAX_PAGE_SIZE),
            count: false,
            track_changes: false,
        }
    }

    /// Opportunities with the given logical columns (plus `customerid`, `modifiedon`).
    pub fn opportunities(columns: &[String], page_size: u32) -> Self {
        Self::new(
            "opportunities",
            "opportunityid",
            opportunity_select(columns),
            page_size,
        )
    }

    /// Connections, with both sides, both roles and statecode.
    pub fn connections(page_size: u32) -> Self {
        Self::new(
            "connections",
            "connectionid",
            CONNECTION_COLUMNS.to_owned(),
            page_size,
        )
    }

    pub fn contacts(page_size: u32) -> Self {
        Self::new(
            "contacts",
            "contactid",
            format!("contactid,{}", *CONTACT_COLUMNS),
            page_size,
        )
    }

    /// Accounts, by name: what a Marketo company takes from one.
    pub fn accounts(page_size: u32) -> Self {
        Self::new(
            "accounts",
            "accountid",
            "accountid,name,modifiedon".to_owned(),
            page_size,
        )
    }

    pub fn filter(mut self, filter: impl Into<String>) -> Self {
        let f: String = filter.into();
        self.filter = (!f.trim().is_empty()).then_some(f);
        self
    }

    pub fn with_count(mut self) -> Self {
        self.count = true;
        self
    }

    pub fn tracking_changes(mut self) -> Self {
        self.track_changes = true;
        self
    }

    fn prefer(&self) -> String {
        let mut p = format!(
            "odata.include-annotations=\"*\",odata.maxpagesize={}",
            self.page_size
        );
        if self.track_changes {
            p.push_str(",odata.track-changes");
        }
        p
    }
}

/// `(field eq id1 or field eq id2 …)`: rows whose `field` is one of `ids`.
pub fn any_of(field: &str, ids: &[Uuid]) -> String {
    let parts: Vec<String> = ids.iter().map(|id| format!("{field} eq {id}")).collect();
    format!("({})", parts.join(" or "))
}

/// One entry of a page.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A row as it is now (webhook vocabulary).
    Row(RowRecord),
    /// A row deleted since the delta token (change tracking only).
    Deleted(Uuid),
}

/// One page of a collection read.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub changes: Vec<Change>,
    /// The link of the next page, if any: a cursor to resume from.
    pub next_link: Option<String>,
    /// On the last page of a tracked read: where to ask for later changes.
    pub delta_link: Option<String>,
    /// The total number of rows the query matches, when counted.
    pub total: Option<u64>,
}

impl Page {
    pub fn rows(&self) -> impl Iterator<Item = &RowRecord> {
        self.changes.iter().filter_map(|c| match c {
            Change::Row(r) => Some(r),
            Change::Deleted(_) => None,
        })
    }
}

#[derive(Deserialize)]
struct RawPage {
    value: Vec<Box<RawValue>>,
    #[serde(rename = "@odata.nextLink")]
    next_link: Option<String>,
    #[serde(rename = "@odata.deltaLink")]
    delta_link: Option<String>,
    #[serde(rename = "@odata.count")]
    count: Option<u64>,
    #[serde(rename = "@Microsoft.Dynamics.CRM.totalrecordcount")]
    total_record_count: Option<i64>,
}

impl DataverseClient {
    /// The first page of `query`.
    pub async fn first_page(&self, query: &CollectionQuery) -> Result<Page, WebApiError> {
        let mut params: Vec<(&str, &str)> = vec![("$select", query.select.as_str())];
        if let Some(f) = &query.filter {
            params.push(("$filter", f.as_str()));
        }
        if query.count {
            params.push(("$count", "true"));
        }
        let url = self.api_url(&query.entity_set, &params)?;
        self.page(url, query).await
    }

    /// The page a `next_link` or `delta_link` of `query` names.
    pub async fn page_at(&self, link: &str, query: &CollectionQuery) -> Result<Page, WebApiError> {
        let url = Url::parse(link)
            .map_err(|e| WebApiError::Rejected(format!("{}: bad paging link: {e}", query.entity_set)))?;
        // The bearer token goes only to the organisation's own Web API.
        if !url.as_str().starts_with(self.inner.api_base.as_str()) {
            return Err(WebApiError::Rejected(format!(
                "{}: the paging link {link:?} is not on {}",
                query.entity_set, self.inner.api_base
            )));
        }
        self.page(url, query).await
    }

    async fn page(&self, url: Url, query: &CollectionQuery) -> Result<Page, WebApiError> {
        let set = &query.entity_set;
        let reply = self
            .execute_with(Method::GET, url, None, false, Some(&query.prefer()), &[])
            .await
            .map_err(|e| match e {
                WebApiError::Rejected(m)
                    if m.contains(CHANGE_TRACKING_OFF_CODE)
                        || m.to_ascii_lowercase().contains("not enabled for change tracking") =>
                {
                    WebApiError::ChangeTrackingOff(set.clone())
                }
                other => other,
            })?;
        if reply.status == StatusCode::NOT_FOUND {
            return Err(WebApiError::Rejected(format!(
                "{set}: not found: {}",
                odata_error(&reply.body)
            )));
        }
        let raw: RawPage = serde_json::from_str(&reply.body)
            .map_err(|e| WebApiError::Rejected(format!("{set}: unreadable collection page: {e}")))?;
        let mut changes = Vec::with_capacity(raw.value.len());
        for item in &raw.value {
            changes.push(change(item, &query.primary_key, set)?);
        }
        let total = raw
            .total_record_count
            .and_then(|t| u64::try_from(t).ok())
            .or(raw.count);
        Ok(Page {
            changes,
            next_link: raw.next_link,
            delta_link: raw.delta_link,
            total,
        })
    }
}

fn change(item: &RawValue, primary_key: &str, set: &str) -> Result<Change, WebApiError> {
    let fields = parse_object(item.get())?;
    let text = |k: &str| {
        fields
            .get(k)
            .and_then(|r| serde_json::from_str::<String>(r.get()).ok())
    };
    if text("@odata.context").is_some_and(|c| c.contains("$deletedEntity")) {
        let id = text("id")
            .and_then(|s| Uuid::parse_str(&s).ok())
            .ok_or_else(|| WebApiError::Rejected(format!("{set}: a deleted entry without a valid id")))?;
        return Ok(Change::Deleted(id));
    }
    let id = text(primary_key)
        .and_then(|s| Uuid::parse_str(&s).ok())
        .ok_or_else(|| WebApiError::Rejected(format!("{set}: a row without a valid {primary_key}")))?;
    Ok(Change::Row(RowRecord {
        id,
        attributes: convert_row(&fields)?,
        modified_on: modified_on(&fields)?,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::{Duration, Instant};

    use time::macros::datetime;

    use super::*;
    use crate::dynamics::{AttributeValue, Attributes};
    use crate::sim::dataverse::{DataverseSim, DataverseSimHandle};

    fn seed(sim: &DataverseSimHandle, n: usize) -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
        for (i, id) in ids.iter().enumerate() {
            let mut a = Attributes::new();
            a.insert("name".into(), AttributeValue::String(format!("Deal {i}")));
            a.insert(
                "statecode".into(),
                AttributeValue::OptionSet(i32::from(i % 3 == 0)),
            );
            a.insert(
                "modifiedon".into(),
                AttributeValue::DateTime(datetime!(2025-01-01 0:00 UTC) + time::Duration::days(i as i64)),
            );
            sim.put_opportunity(*id, a);
        }
        ids.sort();
        ids
    }

    fn client(sim: &DataverseSimHandle) -> DataverseClient {
        DataverseClient::new(&sim.config()).unwrap()
    }

    fn ids(page: &Page) -> Vec<Uuid> {
        page.changes
            .iter()
            .map(|c| match c {
                Change::Row(r) => r.id,
                Change::Deleted(id) => *id,
            })
            .collect()
    }

    async fn read_all(c: &DataverseClient, q: &CollectionQuery) -> (Vec<Page>, Vec<Uuid>) {
        let mut pages = vec![c.first_page(q).await.unwrap()];
        while let Some(next) = pages.last().unwrap().next_link.clone() {
            pages.push(c.page_at(&next, q).await.unwrap());
        }
        let all = pages.iter().flat_map(ids).collect();
        (pages, all)
    }

    #[tokio::test]
    async fn a_collection_is_read_page_by_page_with_its_total() {
        let sim = DataverseSim::start().await.unwrap();
        let expected = seed(&sim, 25);
        let c = client(&sim);
        let q = CollectionQuery::opportunities(&["name".into(), "statecode".into()], 10).with_count();
        let (pages, all) = read_all(&c, &q).await;
        assert_eq!(
            pages.iter().map(|p| p.changes.len()).collect::<Vec<_>>(),
            [10, 10, 5]
        );
        assert_eq!(pages[0].total, Some(25));
        assert_eq!(all, expected);
        assert!(pages.iter().all(|p| p.delta_link.is_none()));
        let row = pages[0].rows().next().unwrap();
        assert!(matches!(row.attributes["name"], AttributeValue::String(_)));
        assert!(row.modified_on > 0);
        let calls = sim.calls();
        let reads: Vec<_> = calls
            .iter()
            .filter(|c| c.path.ends_with("/opportunities"))
            .collect();
        assert_eq!(reads.len(), 3);
        assert!(reads.iter().all(|c| {
            c.prefer
                .as_deref()
                .is_some_and(|p| p.contains("odata.maxpagesize=10"))
        }));
    }

    #[tokio::test]
    async fn filters_select_rows_across_pages() {
        let sim = DataverseSim::start().await.unwrap();
        let all = seed(&sim, 30);
        let c = client(&sim);
        let q = CollectionQuery::opportunities(&["name".into()], 4)
            .filter("statecode eq 1 and modifiedon ge 2025-01-10T00:00:00Z")
            .with_count();
        let (pages, got) = read_all(&c, &q).await;
        // i % 3 == 0 and i >= 9: 9, 12, …, 27.
        assert_eq!(got.len(), 7);
        assert_eq!(pages[0].total, Some(7));
        let some: Vec<Uuid> = all[..5].to_vec();
        let q = CollectionQuery::opportunities(&[], 2).filter(any_of("opportunityid", &some));
        let (_, got) = read_all(&c, &q).await;
        assert_eq!(got, some);
        let err = c
            .first_page(&CollectionQuery::opportunities(&[], 2).filter("name has 'x'"))
            .await
            .unwrap_err();
        assert!(matches!(err, WebApiError::Rejected(_)), "{err}");
    }

    #[tokio::test]
    async fn change_tracking_returns_changes_and_deletions_since_the_delta_link() {
        let sim = DataverseSim::start().await.unwrap();
        let ids_before = seed(&sim, 7);
        let c = client(&sim);
        let q = CollectionQuery::opportunities(&["name".into()], 3).tracking_changes();
        let (pages, got) = read_all(&c, &q).await;
        assert_eq!(got, ids_before);
        let delta = pages.last().unwrap().delta_link.clone().unwrap();
        assert!(
            delta.contains("%24deltatoken=") || delta.contains("$deltatoken="),
            "{delta}"
        );

        let changed = ids_before[2];
        let mut a = Attributes::new();
        a.insert("name".into(), AttributeValue::String("Renamed".into()));
        sim.put_opportunity(changed, a);
        sim.remove_opportunity(ids_before[4]);
        let added = seed(&sim, 1)[0];

        let mut changes = Vec::new();
        let mut page = c.page_at(&delta, &q).await.unwrap();
        changes.extend(page.changes.clone());
        while let Some(next) = page.next_link.clone() {
            page = c.page_at(&next, &q).await.unwrap();
            changes.extend(page.changes.clone());
        }
        let next_delta = page.delta_link.clone().unwrap();
        assert_eq!(changes.len(), 3, "{changes:?}");
        assert!(changes.contains(&Change::Deleted(ids_before[4])));
        let rows: Vec<&RowRecord> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Row(r) => Some(r),
                Change::Deleted(_) => None,
            })
            .collect();
        assert!(
            rows.iter()
                .any(|r| r.id == changed && r.attributes["name"] == AttributeValue::String("Renamed".into()))
        );
        assert!(rows.iter().any(|r| r.id == added));

        // Nothing changed since: an empty delta.
        let again = c.page_at(&next_delta, &q).await.unwrap();
        assert!(again.changes.is_empty());
        assert!(again.delta_link.is_some());
    }

    #[tokio::test]
    async fn a_table_without_change_tracking_is_reported_as_such() {
        let sim = DataverseSim::start().await.unwrap();
        seed(&sim, 2);
        sim.set_change_tracking("opportunities", false);
        let q = CollectionQuery::opportunities(&[], 10).tracking_changes();
        let err = client(&sim).first_page(&q).await.unwrap_err();
        assert!(
            matches!(err, WebApiError::ChangeTrackingOff(ref t) if t == "opportunities"),
            "{err}"
        );
        // Without tracking the same read works.
        let page = client(&sim)
            .first_page(&CollectionQuery::opportunities(&[], 10))
            .await
            .unwrap();
        assert_eq!(page.changes.len(), 2);
    }

    #[tokio::test]
    async fn a_page_waits_out_429_and_links_stay_on_the_organisation() {
        let sim = DataverseSim::start().await.unwrap();
        seed(&sim, 3);
        sim.inject_429(1, 1);
        let c = client(&sim);
        let started = Instant::now();
        let q = CollectionQuery::opportunities(&[], 10);
        assert_eq!(c.first_page(&q).await.unwrap().changes.len(), 3);
        assert!(started.elapsed() >= Duration::from_secs(1));
        let err = c
            .page_at("https://elsewhere.example/api/data/v9.2/opportunities", &q)
            .await
            .unwrap_err();
        assert!(matches!(err, WebApiError::Rejected(_)), "{err}");
    }

    #[tokio::test]
    async fn calls_in_flight_stay_within_the_bound() {
        let sim = DataverseSim::start().await.unwrap();
        seed(&sim, 3);
        sim.set_latency(Duration::from_millis(50));
        let mut cfg = sim.config();
        cfg.max_concurrent_requests = 3;
        let c = DataverseClient::new(&cfg).unwrap();
        let q = CollectionQuery::opportunities(&[], 10);
        let reads = (0..12).map(|_| c.first_page(&q));
        for r in futures::future::join_all(reads).await {
            assert_eq!(r.unwrap().changes.len(), 3);
        }
        assert_eq!(sim.max_in_flight(), 3);
    }
}
