//! `oppsync register`: creates or updates the Dynamics service endpoint, steps and images, so a
//! fresh org sends oppsync what it needs (spec §3) and a second run changes nothing.
//!
//! `authvalue` is write-only in Dataverse (spec §3), so a changed webhook key cannot be seen by
//! reading the endpoint back. Instead the endpoint's `description` carries a short, salted
//! SHA-256 fingerprint of the key; when it differs from the configured key's fingerprint the key
//! is written again. Only people who can read service endpoints (system administrators and
//! customizers, who could change the endpoint anyway) see the fingerprint, and it is truncated so
//! it does not pin down even a short key.

use std::collections::BTreeSet;
use std::fmt;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use url::Url;
use uuid::Uuid;

use crate::config::Secret;
use crate::dynamics::webapi::{DataverseClient, WebApiError};
use crate::dynamics::{EntityKind, MessageKind};
use crate::rules::{ACCOUNT_ATTRIBUTES, CONNECTION_ATTRIBUTES, CONTACT_ATTRIBUTES};

pub struct RegisterOptions {
    /// e.g. `https://oppsync.example.com/webhooks/dynamics`.
    pub webhook_url: Url,
    pub webhook_key: Secret,
    /// Service endpoint name; `oppsync` by default.
    pub endpoint_name: String,
    /// Opportunity columns oppsync reads: the mapped fields plus `customerid` and `statecode`
    /// (both are added if missing).
    pub opportunity_attributes: Vec<String>,
    pub dry_run: bool,
    /// Turn change tracking on for the tables reconciliation reads where it is off.
    pub enable_change_tracking: bool,
}

/// The tables reconciliation reads (worker::reconcile): with change tracking it sees deletes too.
pub const TRACKED_TABLES: [&str; 4] = ["opportunity", "connection", "contact", "account"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated,
    Unchanged,
    WouldCreate,
    WouldUpdate,
    /// Left as it is, but worth knowing: change tracking off on a table.
    Off,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Unchanged => "unchanged",
            Outcome::WouldCreate => "would create",
            Outcome::WouldUpdate => "would update",
            Outcome::Off => "off",
        })
    }
}

/// What happened to one registration object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterAction {
    /// e.g. `step opportunity Update`.
    pub object: String,
    pub outcome: Outcome,
    /// The changed fields (never a secret value), or the new row's id.
    pub detail: String,
}

#[must_use]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegisterReport {
    pub actions: Vec<RegisterAction>,
}

impl RegisterReport {
    /// Actions that wrote (or, in a dry run, would write) something.
    pub fn changes(&self) -> usize {
        self.actions
            .iter()
            .filter(|a| !matches!(a.outcome, Outcome::Unchanged | Outcome::Off))
            .count()
    }

    fn push(&mut self, object: String, outcome: Outcome, detail: String) {
        // The report is printed once, as a table; the log has each action only at debug.
        tracing::debug!(object = %object, outcome = %outcome, detail = %detail, "registration");
        self.actions.push(RegisterAction {
            object,
            outcome,
            detail,
        });
    }
}

impl fmt::Display for RegisterReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w_object = self
            .actions
            .iter()
            .map(|a| a.object.len())
            .chain(["OBJECT".len()])
            .max()
            .unwrap_or(0);
        let w_outcome = "would create".len();
        writeln!(f, "{:<w_object$}  {:<w_outcome$}  DETAIL", "OBJECT", "OUTCOME")?;
        for a in &self.actions {
            writeln!(
                f,
                "{:<w_object$}  {:<w_outcome$}  {}",
                a.object,
                a.outcome.to_string(),
                a.detail
            )?;
        }
        write!(
            f,
            "{} of {} objects {}",
            self.changes(),
            self.actions.len(),
            if self
                .actions
                .iter()
                .any(|a| { matches!(a.outcome, Outcome::WouldCreate | Outcome::WouldUpdate) })
            {
                "would change (dry run)"
            } else {
                "changed"
            }
        )
    }
}

// Service endpoint values (spec §3).
const CONTRACT_WEBHOOK: i64 = 8;
const AUTHTYPE_WEBHOOK_KEY: i64 = 4;
const MESSAGEFORMAT_JSON: i64 = 2;
// Step values: post-operation, asynchronous, server only.
const STAGE_POST_OPERATION: i64 = 40;
const MODE_ASYNCHRONOUS: i64 = 1;
const RANK: i64 = 1;
const DEPLOYMENT_SERVER: i64 = 0;
const IMAGE_PRE: i64 = 0;
const IMAGE_POST: i64 = 1;

// Update steps fire only on the attributes the rules read (`rules::*_ATTRIBUTES`), so the
// `relatedconnectionid` back-fill of a connection does not fire one (spec §6.2); images carry
// these extra ones too.
const CONNECTION_IMAGE_EXTRA: &[&str] = &["ismaster", "relatedconnectionid"];
const CONTACT_IMAGE_EXTRA: &[&str] = &["fullname"];

struct StepSpec {
    entity: EntityKind,
    message: MessageKind,
    /// Update only.
    filtering: Option<String>,
    /// None where the message takes no image (Win and Lose carry their data as parameters; a
    /// deleted contact needs nothing but its id).
    image: Option<ImageSpec>,
}

struct ImageSpec {
    alias: &'static str,
    image_type: i64,
    property: &'static str,
    attributes: String,
}

/// Sorted, de-duplicated, lower-case comma list, so comparisons ignore order.
fn attribute_list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    items
        .into_iter()
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
        .join(",")
}

fn same_attributes(current: Option<&Value>, desired: &str) -> bool {
    let current = current.and_then(Value::as_str).unwrap_or("");
    attribute_list(current.split(',')) == attribute_list(desired.split(','))
}

fn step_specs(opts: &RegisterOptions) -> Vec<StepSpec> {
    let opportunity = attribute_list(
        opts.opportunity_attributes
            .iter()
            .map(String::as_str)
            .chain(["customerid", "statecode"]),
    );
    // `modifiedon` changes on every save: in the filter it would make every update fire the
    // step. It stays in the image, where it gives the row's version.
    let opportunity_filter = attribute_list(opportunity.split(',').filter(|a| *a != "modifiedon"));
    let connection_filter = attribute_list(CONNECTION_ATTRIBUTES.iter().copied());
    let connection_image = attribute_list(
        CONNECTION_ATTRIBUTES
            .iter()
            .chain(CONNECTION_IMAGE_EXTRA)
            .copied(),
    );
    let contact_filter = attribute_list(CONTACT_ATTRIBUTES.iter().copied());
    let contact_image = attribute_list(CONTACT_ATTRIBUTES.iter().chain(CONTACT_IMAGE_EXTRA).copied());
    let account = attribute_list(ACCOUNT_ATTRIBUTES.iter().copied());
    let post = |property, attributes: &String| {
        Some(ImageSpec {
            alias: "PostImage",
            image_type: IMAGE_POST,
            property,
            attributes: attributes.clone(),
        })
    };
    let pre = |attributes: &String| {
        Some(ImageSpec {
            alias: "PreImage",
            image_type: IMAGE_PRE,
            property: "Target",
            attributes: attributes.clone(),
        })
    };
    use EntityKind as E;
    use MessageKind as M;
    vec![
        StepSpec {
            entity: E::Opportunity,
            message: M::Create,
            filtering: None,
            image: post("Id", &opportunity),
        },
        StepSpec {
            entity: E::Opportunity,
            message: M::Update,
            filtering: Some(opportunity_filter),
            image: post("Target", &opportunity),
        },
        StepSpec {
            entity: E::Opportunity,
            message: M::Delete,
            filtering: None,
            image: pre(&opportunity),
        },
        // Closing a deal is its own message, not an Update (specs/dynamics.md, addendum).
        StepSpec {
            entity: E::Opportunity,
            message: M::Win,
            filtering: None,
            image: None,
        },
        StepSpec {
            entity: E::Opportunity,
            message: M::Lose,
            filtering: None,
            image: None,
        },
        StepSpec {
            entity: E::Connection,
            message: M::Create,
            filtering: None,
            image: post("Id", &connection_image),
        },
        StepSpec {
            entity: E::Connection,
            message: M::Update,
            filtering: Some(connection_filter),
            image: post("Target", &connection_image),
        },
        StepSpec {
            entity: E::Connection,
            message: M::Delete,
            filtering: None,
            image: pre(&connection_image),
        },
        StepSpec {
            entity: E::Contact,
            message: M::Create,
            filtering: None,
            image: post("Id", &contact_image),
        },
        StepSpec {
            entity: E::Contact,
            message: M::Update,
            filtering: Some(contact_filter),
            image: post("Target", &contact_image),
        },
        // A deleted contact loses its roles.
        StepSpec {
            entity: E::Contact,
            message: M::Delete,
            filtering: None,
            image: None,
        },
        // A renamed account renames its Marketo company.
        StepSpec {
            entity: E::Account,
            message: M::Update,
            filtering: Some(account.clone()),
            image: post("Target", &account),
        },
    ]
}

/// Salted, truncated SHA-256 of the webhook key (see the module comment).
fn key_fingerprint(key: &Secret) -> String {
    let digest = Sha256::digest(format!("oppsync webhook key v1:{}", key.expose()));
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn endpoint_description(key: &Secret) -> String {
    format!(
        "Managed by oppsync register. key-fingerprint:{}",
        key_fingerprint(key)
    )
}

/// An OData string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn id_of(row: &Map<String, Value>, key: &str) -> Result<Uuid, WebApiError> {
    row.get(key)
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| WebApiError::Rejected(format!("row without a valid {key}")))
}

/// Fields of `desired` whose value differs from `current`.
fn differing(current: &Map<String, Value>, desired: &Map<String, Value>) -> Map<String, Value> {
    desired
        .iter()
        .filter(|(k, v)| {
            let have = current.get(*k).unwrap_or(&Value::Null);
            match (have, v) {
                (Value::Number(a), Value::Number(b)) => a.as_f64() != b.as_f64(),
                (a, b) => a != *b,
            }
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn as_object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Creates or updates the service endpoint, its steps and their images.
pub async fn register(
    client: &DataverseClient,
    opts: &RegisterOptions,
) -> Result<RegisterReport, WebApiError> {
    if opts.endpoint_name.trim().is_empty() {
        return Err(WebApiError::Config("the endpoint name is empty".into()));
    }
    let mut report = RegisterReport::default();
    let endpoint = ensure_endpoint(client, opts, &mut report).await?;
    for spec in step_specs(opts) {
        let step = ensure_step(client, opts, endpoint, &spec, &mut report).await?;
        ensure_image(client, opts, step, &spec, &mut report).await?;
    }
    for table in TRACKED_TABLES {
        ensure_change_tracking(client, opts, table, &mut report).await?;
    }
    Ok(report)
}

/// Reports a table's change tracking, and turns it on when asked: without it reconciliation
/// reads `modifiedon` and cannot see a delete whose webhook was lost.
async fn ensure_change_tracking(
    client: &DataverseClient,
    opts: &RegisterOptions,
    table: &str,
    report: &mut RegisterReport,
) -> Result<(), WebApiError> {
    let object = format!("change tracking {table}");
    if client.change_tracking_enabled(table).await? {
        report.push(object, Outcome::Unchanged, "on".into());
    } else if !opts.enable_change_tracking {
        report.push(
            object,
            Outcome::Off,
            "reconciliation cannot see deletes of this table; --enable-change-tracking turns it on".into(),
        );
    } else if opts.dry_run {
        report.push(
            object,
            Outcome::WouldUpdate,
            "ChangeTrackingEnabled: false -> true".into(),
        );
    } else {
        client.enable_change_tracking(table).await?;
        report.push(
            object,
            Outcome::Updated,
            "ChangeTrackingEnabled: false -> true".into(),
        );
    }
    Ok(())
}

/// The endpoint's id, or `None` when a dry run would create it.
async fn ensure_endpoint(
    client: &DataverseClient,
    opts: &RegisterOptions,
    report: &mut RegisterReport,
) -> Result<Option<Uuid>, WebApiError> {
    let object = format!("service endpoint {}", opts.endpoint_name);
    let desired = as_object(json!({
        "name": opts.endpoint_name,
        "contract": CONTRACT_WEBHOOK,
        "authtype": AUTHTYPE_WEBHOOK_KEY,
        "messageformat": MESSAGEFORMAT_JSON,
        "url": opts.webhook_url.as_str(),
        "description": endpoint_description(&opts.webhook_key),
    }));
    let existing = client
        .query_rows(
            "serviceendpoints",
            "serviceendpointid,name,contract,authtype,messageformat,url,description",
            &format!("name eq {}", literal(&opts.endpoint_name)),
        )
        .await?;
    if existing.len() > 1 {
        return Err(WebApiError::Rejected(format!(
            "{} service endpoints are named {:?}; remove the extra ones or choose another name",
            existing.len(),
            opts.endpoint_name
        )));
    }
    let Some(current) = existing.into_iter().next() else {
        if opts.dry_run {
            report.push(object, Outcome::WouldCreate, String::new());
            return Ok(None);
        }
        let mut body = desired;
        body.insert("authvalue".into(), json!(opts.webhook_key.expose()));
        let id = client
            .create_row("serviceendpoints", &Value::Object(body))
            .await?;
        report.push(object, Outcome::Created, id.to_string());
        return Ok(Some(id));
    };
    let id = id_of(&current, "serviceendpointid")?;
    let mut patch = differing(&current, &desired);
    // The description changes exactly when the key's fingerprint does.
    let mut changed: Vec<String> = patch
        .keys()
        .map(|k| {
            if k == "description" {
                "key".into()
            } else {
                k.clone()
            }
        })
        .collect();
    if patch.contains_key("description") {
        patch.insert("authvalue".into(), json!(opts.webhook_key.expose()));
    }
    changed.sort();
    if patch.is_empty() {
        report.push(object, Outcome::Unchanged, String::new());
    } else if opts.dry_run {
        report.push(object, Outcome::WouldUpdate, changed.join(", "));
    } else {
        client
            .update_row("serviceendpoints", id, &Value::Object(patch))
            .await?;
        report.push(object, Outcome::Updated, changed.join(", "));
    }
    Ok(Some(id))
}

async fn message_filter(client: &DataverseClient, spec: &StepSpec) -> Result<(Uuid, Uuid), WebApiError> {
    let message = spec.message.name();
    let entity = spec.entity.logical_name();
    let messages = client
        .query_rows(
            "sdkmessages",
            "sdkmessageid,name",
            &format!("name eq {}", literal(message)),
        )
        .await?;
    let message_id = match messages.first() {
        Some(m) => id_of(m, "sdkmessageid")?,
        None => {
            return Err(WebApiError::Rejected(format!(
                "the org has no sdkmessage named {message}"
            )));
        }
    };
    let filters = client
        .query_rows(
            "sdkmessagefilters",
            "sdkmessagefilterid,primaryobjecttypecode",
            &format!(
                "_sdkmessageid_value eq {message_id} and primaryobjecttypecode eq {}",
                literal(entity)
            ),
        )
        .await?;
    let filter_id = match filters.first() {
        Some(f) => id_of(f, "sdkmessagefilterid")?,
        None => {
            return Err(WebApiError::Rejected(format!(
                "the org has no message filter for {message} of {entity}"
            )));
        }
    };
    Ok((message_id, filter_id))
}

/// The step's id, or `None` when a dry run would create it.
async fn ensure_step(
    client: &DataverseClient,
    opts: &RegisterOptions,
    endpoint: Option<Uuid>,
    spec: &StepSpec,
    report: &mut RegisterReport,
) -> Result<Option<Uuid>, WebApiError> {
    let entity = spec.entity.logical_name();
    let message = spec.message.name();
    let object = format!("step {entity} {message}");
    let (message_id, filter_id) = message_filter(client, spec).await?;
    let mut desired = as_object(json!({
        "name": format!("{}: {entity} {message}", opts.endpoint_name),
        "description": "Sends the change to oppsync (asynchronous, post-operation).",
        "stage": STAGE_POST_OPERATION,
        "mode": MODE_ASYNCHRONOUS,
        "rank": RANK,
        "supporteddeployment": DEPLOYMENT_SERVER,
        "asyncautodelete": true,
    }));
    if let Some(f) = &spec.filtering {
        desired.insert("filteringattributes".into(), json!(f));
    }
    let existing = match endpoint {
        Some(endpoint) => client
            .query_rows(
                "sdkmessageprocessingsteps",
                "sdkmessageprocessingstepid,name,description,stage,mode,rank,supporteddeployment,asyncautodelete,filteringattributes",
                &format!(
                    "_eventhandler_value eq {endpoint} and _sdkmessagefilterid_value eq {filter_id}"
                ),
            )
            .await?
            .into_iter()
            .next(),
        None => None,
    };
    let Some(current) = existing else {
        if opts.dry_run {
            report.push(object, Outcome::WouldCreate, String::new());
            return Ok(None);
        }
        let Some(endpoint) = endpoint else {
            return Err(WebApiError::Rejected(
                "no service endpoint to bind the step to".into(),
            ));
        };
        let mut body = desired;
        body.insert(
            "eventhandler_serviceendpoint@odata.bind".into(),
            json!(format!("/serviceendpoints({endpoint})")),
        );
        body.insert(
            "sdkmessageid@odata.bind".into(),
            json!(format!("/sdkmessages({message_id})")),
        );
        body.insert(
            "sdkmessagefilterid@odata.bind".into(),
            json!(format!("/sdkmessagefilters({filter_id})")),
        );
        let id = client
            .create_row("sdkmessageprocessingsteps", &Value::Object(body))
            .await?;
        report.push(object, Outcome::Created, id.to_string());
        return Ok(Some(id));
    };
    let id = id_of(&current, "sdkmessageprocessingstepid")?;
    let mut patch = differing(&current, &desired);
    if let Some(f) = &spec.filtering
        && same_attributes(current.get("filteringattributes"), f)
    {
        patch.remove("filteringattributes");
    }
    apply_patch(
        client,
        "sdkmessageprocessingsteps",
        id,
        patch,
        object,
        opts,
        report,
    )
    .await?;
    Ok(Some(id))
}

async fn ensure_image(
    client: &DataverseClient,
    opts: &RegisterOptions,
    step: Option<Uuid>,
    spec: &StepSpec,
    report: &mut RegisterReport,
) -> Result<(), WebApiError> {
    let Some(image) = &spec.image else {
        return Ok(());
    };
    let object = format!(
        "image {} {} {}",
        spec.entity.logical_name(),
        spec.message.name(),
        image.alias
    );
    let desired = as_object(json!({
        "name": image.alias,
        "entityalias": image.alias,
        "imagetype": image.image_type,
        "messagepropertyname": image.property,
        "attributes": image.attributes,
    }));
    let existing = match step {
        Some(step) => client
            .query_rows(
                "sdkmessageprocessingstepimages",
                "sdkmessageprocessingstepimageid,name,entityalias,imagetype,messagepropertyname,attributes",
                &format!(
                    "_sdkmessageprocessingstepid_value eq {step} and entityalias eq {}",
                    literal(image.alias)
                ),
            )
            .await?
            .into_iter()
            .next(),
        None => None,
    };
    let Some(current) = existing else {
        if opts.dry_run {
            report.push(object, Outcome::WouldCreate, String::new());
            return Ok(());
        }
        let Some(step) = step else {
            return Err(WebApiError::Rejected("no step to bind the image to".into()));
        };
        let mut body = desired;
        body.insert(
            "sdkmessageprocessingstepid@odata.bind".into(),
            json!(format!("/sdkmessageprocessingsteps({step})")),
        );
        let id = client
            .create_row("sdkmessageprocessingstepimages", &Value::Object(body))
            .await?;
        report.push(object, Outcome::Created, id.to_string());
        return Ok(());
    };
    let id = id_of(&current, "sdkmessageprocessingstepimageid")?;
    let mut patch = differing(&current, &desired);
    if same_attributes(current.get("attributes"), &image.attributes) {
        patch.remove("attributes");
    }
    apply_patch(
        client,
        "sdkmessageprocessingstepimages",
        id,
        patch,
        object,
        opts,
        report,
    )
    .await
}

async fn apply_patch(
    client: &DataverseClient,
    entity_set: &str,
    id: Uuid,
    patch: Map<String, Value>,
    object: String,
    opts: &RegisterOptions,
    report: &mut RegisterReport,
) -> Result<(), WebApiError> {
    let changed = patch.keys().cloned().collect::<Vec<_>>().join(", ");
    if patch.is_empty() {
        report.push(object, Outcome::Unchanged, String::new());
    } else if opts.dry_run {
        report.push(object, Outcome::WouldUpdate, changed);
    } else {
        client.update_row(entity_set, id, &Value::Object(patch)).await?;
        report.push(object, Outcome::Updated, changed);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::sim::dataverse::{DataverseSim, DataverseSimHandle};

    const KEY: &str = "webhook-key-very-secret-123";

    fn options(url: &str, dry_run: bool) -> RegisterOptions {
        RegisterOptions {
            enable_change_tracking: false,
            webhook_url: Url::parse(url).unwrap(),
            webhook_key: Secret::new(KEY),
            endpoint_name: "oppsync".into(),
            opportunity_attributes: [
                "name",
                "estimatedvalue",
                "closeprobability",
                "estimatedclosedate",
                "modifiedon",
            ]
            .map(String::from)
            .to_vec(),
            dry_run,
        }
    }

    const HOOK: &str = "https://oppsync.example.com/webhooks/dynamics";

    async fn setup() -> (DataverseSimHandle, DataverseClient) {
        let sim = DataverseSim::start().await.unwrap();
        let client = DataverseClient::new(&sim.config()).unwrap();
        (sim, client)
    }

    fn outcomes(r: &RegisterReport) -> Vec<Outcome> {
        r.actions.iter().map(|a| a.outcome).collect()
    }

    fn str_of<'a>(v: &'a Value, k: &str) -> &'a str {
        v[k].as_str().unwrap_or_else(|| panic!("{k} missing in {v}"))
    }

    /// The step for (entity, message), found through its message filter.
    fn step_for(sim: &DataverseSimHandle, entity: &str, message: &str) -> Value {
        sim.rows("sdkmessageprocessingsteps")
            .into_iter()
            .find(|s| {
                let filter = sim
                    .row(
                        "sdkmessagefilters",
                        Uuid::parse_str(str_of(s, "_sdkmessagefilterid_value")).unwrap(),
                    )
                    .unwrap();
                let msg = sim
                    .row(
                        "sdkmessages",
                        Uuid::parse_str(str_of(s, "_sdkmessageid_value")).unwrap(),
                    )
                    .unwrap();
                filter["primaryobjecttypecode"] == entity && msg["name"] == message
            })
            .unwrap_or_else(|| panic!("no step for {entity} {message}"))
    }

    fn image_for(sim: &DataverseSimHandle, step: &Value) -> Value {
        let id = str_of(step, "sdkmessageprocessingstepid");
        let images: Vec<Value> = sim
            .rows("sdkmessageprocessingstepimages")
            .into_iter()
            .filter(|i| i["_sdkmessageprocessingstepid_value"] == id)
            .collect();
        assert_eq!(images.len(), 1, "{images:?}");
        images.into_iter().next().unwrap()
    }

    #[tokio::test]
    async fn a_fresh_org_gets_endpoint_steps_and_images() {
        let (sim, client) = setup().await;
        let report = register(&client, &options(HOOK, false)).await.unwrap();
        // 22 registration objects, then the change tracking of the 4 tables reconciled.
        assert_eq!(report.actions.len(), 26, "{report}");
        let outcomes = outcomes(&report);
        assert!(outcomes[..22].iter().all(|o| *o == Outcome::Created), "{report}");
        assert!(
            outcomes[22..].iter().all(|o| *o == Outcome::Unchanged),
            "{report}"
        );
        let shown = report.to_string();
        assert!(!shown.contains(KEY), "{shown}");
        for step in [
            "step opportunity Update",
            "step opportunity Win",
            "step opportunity Lose",
            "step contact Delete",
            "step account Update",
            "image account Update PostImage",
        ] {
            assert!(shown.contains(step), "{step}: {shown}");
        }

        let endpoints = sim.rows("serviceendpoints");
        assert_eq!(endpoints.len(), 1);
        let ep = &endpoints[0];
        assert_eq!(ep["contract"], 8);
        assert_eq!(ep["authtype"], 4);
        assert_eq!(ep["messageformat"], 2);
        assert_eq!(ep["url"], HOOK);
        assert_eq!(ep["name"], "oppsync");
        assert!(!ep.to_string().contains(KEY));
        let ep_id = Uuid::parse_str(str_of(ep, "serviceendpointid")).unwrap();
        assert_eq!(sim.authvalue(ep_id).as_deref(), Some(KEY));

        let steps = sim.rows("sdkmessageprocessingsteps");
        assert_eq!(steps.len(), 12);
        for s in &steps {
            assert_eq!(s["stage"], 40, "{s}");
            assert_eq!(s["mode"], 1, "{s}");
            assert_eq!(s["rank"], 1, "{s}");
            assert_eq!(s["supporteddeployment"], 0, "{s}");
            assert_eq!(s["asyncautodelete"], true, "{s}");
            assert_eq!(s["_eventhandler_value"], ep_id.to_string(), "{s}");
            assert_eq!(
                s["_eventhandler_value@Microsoft.Dynamics.CRM.lookuplogicalname"],
                "serviceendpoint"
            );
        }
        // `modifiedon` is in the images (the row's version) but never in the filter, where it
        // would fire the step on every save.
        let opp_attrs =
            "closeprobability,customerid,estimatedclosedate,estimatedvalue,modifiedon,name,statecode";
        let opp_update = step_for(&sim, "opportunity", "Update");
        assert_eq!(
            opp_update["filteringattributes"],
            "closeprobability,customerid,estimatedclosedate,estimatedvalue,name,statecode"
        );
        assert_eq!(
            step_for(&sim, "connection", "Update")["filteringattributes"],
            "record1id,record1roleid,record2id,record2roleid,statecode"
        );
        assert_eq!(
            step_for(&sim, "contact", "Update")["filteringattributes"],
            "emailaddress1,firstname,lastname,merged,parentcustomerid"
        );
        assert_eq!(step_for(&sim, "account", "Update")["filteringattributes"], "name");
        let img = image_for(&sim, &step_for(&sim, "account", "Update"));
        assert_eq!(
            (&img["entityalias"], &img["attributes"]),
            (&json!("PostImage"), &json!("name"))
        );
        // Win and Lose are PostOperation, asynchronous, without images (their data are the
        // message's parameters); so is the contact Delete.
        for (entity, message) in [
            ("opportunity", "Win"),
            ("opportunity", "Lose"),
            ("contact", "Delete"),
        ] {
            let step = step_for(&sim, entity, message);
            assert_eq!(
                (&step["stage"], &step["mode"]),
                (&json!(40), &json!(1)),
                "{entity} {message}"
            );
            let id = str_of(&step, "sdkmessageprocessingstepid");
            assert!(
                !sim.rows("sdkmessageprocessingstepimages")
                    .iter()
                    .any(|i| i["_sdkmessageprocessingstepid_value"] == id),
                "{entity} {message} has no image"
            );
        }
        assert!(
            step_for(&sim, "opportunity", "Create")
                .get("filteringattributes")
                .is_none()
        );

        let img = image_for(&sim, &opp_update);
        assert_eq!(img["entityalias"], "PostImage");
        assert_eq!(img["imagetype"], 1);
        assert_eq!(img["messagepropertyname"], "Target");
        assert_eq!(img["attributes"], opp_attrs);
        let img = image_for(&sim, &step_for(&sim, "opportunity", "Create"));
        assert_eq!(img["messagepropertyname"], "Id");
        assert_eq!(img["imagetype"], 1);
        let img = image_for(&sim, &step_for(&sim, "opportunity", "Delete"));
        assert_eq!(img["entityalias"], "PreImage");
        assert_eq!(img["imagetype"], 0);
        assert_eq!(img["messagepropertyname"], "Target");
        assert_eq!(img["attributes"], opp_attrs);
        let img = image_for(&sim, &step_for(&sim, "connection", "Delete"));
        assert_eq!(img["entityalias"], "PreImage");
        assert!(str_of(&img, "attributes").contains("record2roleid"));
        let img = image_for(&sim, &step_for(&sim, "contact", "Update"));
        assert_eq!(img["entityalias"], "PostImage");
        assert!(str_of(&img, "attributes").contains("parentcustomerid"));
        assert_eq!(sim.rows("sdkmessageprocessingstepimages").len(), 9);
    }

    #[tokio::test]
    async fn a_second_run_changes_nothing() {
        let (sim, client) = setup().await;
        let _ = register(&client, &options(HOOK, false)).await.unwrap();
        let writes = sim.write_count();
        let again = register(&client, &options(HOOK, false)).await.unwrap();
        assert_eq!(again.changes(), 0, "{again}");
        assert_eq!(again.actions.len(), 26);
        assert_eq!(sim.write_count(), writes);
    }

    #[tokio::test]
    async fn a_changed_url_or_key_updates_only_the_endpoint() {
        let (sim, client) = setup().await;
        let _ = register(&client, &options(HOOK, false)).await.unwrap();
        let moved = "https://new.example.com/webhooks/dynamics";
        let report = register(&client, &options(moved, false)).await.unwrap();
        assert_eq!(report.changes(), 1, "{report}");
        assert_eq!(report.actions[0].outcome, Outcome::Updated);
        assert_eq!(report.actions[0].detail, "url");
        let ep = &sim.rows("serviceendpoints")[0];
        assert_eq!(ep["url"], moved);
        let ep_id = Uuid::parse_str(str_of(ep, "serviceendpointid")).unwrap();

        let mut rotated = options(moved, false);
        rotated.webhook_key = Secret::new("rotated-webhook-key-456");
        let report = register(&client, &rotated).await.unwrap();
        assert_eq!(report.changes(), 1, "{report}");
        assert_eq!(report.actions[0].detail, "key");
        assert!(!report.to_string().contains("rotated-webhook-key-456"));
        assert_eq!(sim.authvalue(ep_id).as_deref(), Some("rotated-webhook-key-456"));
        assert_eq!(sim.rows("serviceendpoints").len(), 1);
        assert_eq!(sim.rows("sdkmessageprocessingsteps").len(), 12);
    }

    #[tokio::test]
    async fn changed_opportunity_attributes_update_the_step_and_its_images() {
        let (sim, client) = setup().await;
        let _ = register(&client, &options(HOOK, false)).await.unwrap();
        let mut opts = options(HOOK, false);
        opts.opportunity_attributes.push("description".into());
        let report = register(&client, &opts).await.unwrap();
        let changed: Vec<&str> = report
            .actions
            .iter()
            .filter(|a| a.outcome == Outcome::Updated)
            .map(|a| a.object.as_str())
            .collect();
        assert_eq!(
            changed,
            [
                "image opportunity Create PostImage",
                "step opportunity Update",
                "image opportunity Update PostImage",
                "image opportunity Delete PreImage"
            ]
        );
        assert!(
            str_of(&step_for(&sim, "opportunity", "Update"), "filteringattributes").contains("description")
        );
    }

    #[tokio::test]
    async fn a_dry_run_writes_nothing() {
        let (sim, client) = setup().await;
        let report = register(&client, &options(HOOK, true)).await.unwrap();
        assert_eq!(report.actions.len(), 26);
        let shown = report.to_string();
        for step in [
            "step opportunity Win",
            "step opportunity Lose",
            "step contact Delete",
            "step account Update",
        ] {
            let line = shown
                .lines()
                .find(|l| l.starts_with(&format!("{step} ")))
                .unwrap_or("");
            assert!(line.contains("would create"), "{step}: {shown}");
        }
        assert!(
            outcomes(&report)[..22].iter().all(|o| *o == Outcome::WouldCreate),
            "{report}"
        );
        assert_eq!(sim.write_count(), 0);
        assert!(report.to_string().contains("dry run"));

        let _ = register(&client, &options(HOOK, false)).await.unwrap();
        let writes = sim.write_count();
        let report = register(&client, &options("https://moved.example.com/hook", true))
            .await
            .unwrap();
        assert_eq!(report.actions[0].outcome, Outcome::WouldUpdate);
        assert_eq!(report.changes(), 1, "{report}");
        assert_eq!(sim.write_count(), writes);
    }

    #[test]
    fn fingerprints_differ_by_key_and_hide_it() {
        let a = endpoint_description(&Secret::new(KEY));
        assert_ne!(a, endpoint_description(&Secret::new("another-key-789")));
        assert!(!a.contains(KEY));
    }
}
