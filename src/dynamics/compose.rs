//! Builds webhook bodies exactly as Dynamics sends them (a DCJS-serialised
//! `RemoteExecutionContext`, specs/dynamics.md §1, §9), for tests, the demo, the benchmarks and
//! the reliability harness.
//!
//! The output is compact JSON with the DCJS conventions: members in alphabetical order, `/`
//! escaped as `\/`, control characters as `\u00XX`, dictionaries as key/value arrays, `__type`
//! hints only on object-typed values, images without `__type`, dates as `"\/Date(ms)\/"`.
//!
//! Ids that are not given are derived from the entity, message, record id and version, so the
//! same builder calls always give the same body (and the same dedupe key).

use std::fmt::Write as _;

use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use super::event::{EntityKind, MessageKind, Version};
use super::value::{AttributeValue, Attributes, Entity, EntityRef};

const CONTRACTS: &str = "http://schemas.microsoft.com/xrm/2011/Contracts";

/// The header Dynamics adds when it dropped InputParameters, images and ParentContext (§2).
pub const SIZE_EXCEEDED_HEADER: &str = "x-ms-dynamics-msg-size-exceeded";

/// A notification under construction. Start from one of the constructors, adjust, then call
/// [`NotificationBuilder::to_json`] and [`NotificationBuilder::headers`].
#[derive(Debug, Clone)]
#[must_use]
pub struct NotificationBuilder {
    entity: EntityKind,
    message: MessageKind,
    record_id: Uuid,
    version_ms: Version,
    /// Target attributes in insertion order (DCJS keeps the collection's order).
    target: Vec<(String, AttributeValue)>,
    formatted_values: Vec<(String, String)>,
    pre_images: Vec<(String, Vec<(String, AttributeValue)>)>,
    post_images: Vec<(String, Vec<(String, AttributeValue)>)>,
    async_primary_name_image: bool,
    operation_id: Option<Uuid>,
    correlation_id: Uuid,
    request_id: Option<Uuid>,
    operation_created_on_ms: i64,
    stage: i32,
    mode: i32,
    depth: i32,
    organization_name: String,
    organization_domain: String,
    size_exceeded: bool,
    parent_context: bool,
    organization_id: Uuid,
    /// InputParameters of a state change (Win, Lose, SetState…), which has no Target.
    parameters: Vec<(String, Parameter)>,
}

/// A message parameter other than Target.
#[derive(Debug, Clone)]
enum Parameter {
    Value(AttributeValue),
    /// An Entity (`OpportunityClose`), written with its `__type` hint.
    Entity {
        logical_name: String,
        attributes: Vec<(String, AttributeValue)>,
    },
}

impl NotificationBuilder {
    /// A PostOperation, asynchronous notification of `message` on `entity`. The Target holds
    /// the primary key and, except for Delete, `modifiedon` = `version_ms`.
    pub fn new(entity: EntityKind, message: MessageKind, record_id: Uuid, version_ms: Version) -> Self {
        let seed = format!(
            "{}|{}|{record_id}|{version_ms}",
            entity.logical_name(),
            message.name()
        );
        let mut builder = NotificationBuilder {
            entity,
            message,
            record_id,
            version_ms,
            target: Vec::new(),
            formatted_values: Vec::new(),
            pre_images: Vec::new(),
            post_images: Vec::new(),
            // Async steps always get this image, except Delete where the row is gone (§1.7, §9.3).
            async_primary_name_image: message != MessageKind::Delete && !message.is_state_change(),
            operation_id: Some(derived_uuid("operation", &seed)),
            correlation_id: derived_uuid("correlation", &seed),
            request_id: Some(derived_uuid("request", &seed)),
            operation_created_on_ms: version_ms,
            stage: 40,
            mode: 1,
            depth: 1,
            organization_name: "unq4ef5b371e89ee7118122000d3aa23".to_owned(),
            organization_domain: DEFAULT_ORGANIZATION_DOMAIN.to_owned(),
            size_exceeded: false,
            parent_context: false,
            organization_id: DEFAULT_ORGANIZATION_ID,
            parameters: Vec::new(),
        };
        if message != MessageKind::Delete && !message.is_state_change() {
            let at = AttributeValue::DateTime(datetime_from_ms(version_ms));
            builder = builder.attr(primary_key(entity), AttributeValue::String(record_id.to_string()));
            if message == MessageKind::Create {
                builder = builder.attr("createdon", at.clone());
            }
            builder = builder.attr("modifiedon", at);
        }
        builder
    }

    pub fn opportunity_create(id: Uuid, version_ms: Version) -> Self {
        Self::new(EntityKind::Opportunity, MessageKind::Create, id, version_ms)
    }
    pub fn opportunity_update(id: Uuid, version_ms: Version) -> Self {
        Self::new(EntityKind::Opportunity, MessageKind::Update, id, version_ms)
    }
    pub fn opportunity_delete(id: Uuid, version_ms: Version) -> Self {
        Self::new(EntityKind::Opportunity, MessageKind::Delete, id, version_ms)
    }
    pub fn connection_create(id: Uuid, version_ms: Version) -> Self {
        Self::new(EntityKind::Connection, MessageKind::Create, id, version_ms)
    }
    pub fn connection_update(id: Uuid, version_ms: Version) -> Self {
        Self::new(EntityKind::Connection, MessageKind::Update, id, version_ms)
    }
    pub fn connection_delete(id: Uuid, version_ms: Version) -> Self {
        Self::new(EntityKind::Connection, MessageKind::Delete, id, version_ms)
    }
    pub fn contact_create(id: Uuid, version_ms: Version) -> Self {
        Self::new(EntityKind::Contact, MessageKind::Create, id, version_ms)
    }
    pub fn contact_update(id: Uuid, version_ms: Version) -> Self {
        Self::new(EntityKind::Contact, MessageKind::Update, id, version_ms)
    }
    pub fn contact_delete(id: Uuid, version_ms: Version) -> Self {
        Self::new(EntityKind::Contact, MessageKind::Delete, id, version_ms)
    }
    pub fn account_update(id: Uuid, version_ms: Version) -> Self {
        Self::new(EntityKind::Account, MessageKind::Update, id, version_ms)
    }

    /// A `Win` (or, with `won` false, `Lose`) of an opportunity, in the shape of
    /// WinOpportunityRequest / LoseOpportunityRequest: InputParameters `OpportunityClose` (an
    /// `opportunityclose` Entity naming the opportunity, with the actual revenue and close date
    /// when given) and `Status` (the status reason; -1 asks for the default). No Target, no
    /// images; `at_ms` is OperationCreatedOn, the change's version.
    pub fn opportunity_close(
        id: Uuid,
        at_ms: Version,
        won: bool,
        status: i32,
        actual_revenue: Option<Decimal>,
        actual_end_ms: Option<i64>,
    ) -> Self {
        let message = if won { MessageKind::Win } else { MessageKind::Lose };
        let mut close = vec![("opportunityid".to_owned(), reference("opportunity", id))];
        if let Some(revenue) = actual_revenue {
            close.push(("actualrevenue".to_owned(), AttributeValue::Money(revenue)));
        }
        if let Some(end) = actual_end_ms {
            close.push((
                "actualend".to_owned(),
                AttributeValue::DateTime(datetime_from_ms(end)),
            ));
        }
        let subject = if won {
            "Opportunity Close - Won"
        } else {
            "Opportunity Close - Lost"
        };
        close.push(("subject".to_owned(), AttributeValue::String(subject.to_owned())));
        close.push(("description".to_owned(), AttributeValue::Null));
        let mut builder = Self::new(EntityKind::Opportunity, message, id, at_ms);
        builder.parameters = vec![
            (
                "OpportunityClose".to_owned(),
                Parameter::Entity {
                    logical_name: "opportunityclose".to_owned(),
                    attributes: close,
                },
            ),
            (
                "Status".to_owned(),
                Parameter::Value(AttributeValue::OptionSet(status)),
            ),
        ];
        builder
    }

    /// A `SetState` (or `SetStateDynamicEntity`) of an opportunity: InputParameters
    /// `EntityMoniker`, `State`, `Status`, as older organisations send them.
    pub fn opportunity_set_state(
        id: Uuid,
        at_ms: Version,
        dynamic_entity: bool,
        state: i32,
        status: i32,
    ) -> Self {
        let message = if dynamic_entity {
            MessageKind::SetStateDynamicEntity
        } else {
            MessageKind::SetState
        };
        let mut builder = Self::new(EntityKind::Opportunity, message, id, at_ms);
        builder.parameters = vec![
            (
                "EntityMoniker".to_owned(),
                Parameter::Value(reference("opportunity", id)),
            ),
            (
                "State".to_owned(),
                Parameter::Value(AttributeValue::OptionSet(state)),
            ),
            (
                "Status".to_owned(),
                Parameter::Value(AttributeValue::OptionSet(status)),
            ),
        ];
        builder
    }

    /// Sets a Target attribute (replacing an earlier value of the same name). Delete bodies
    /// carry an EntityReference as Target, so attributes set on them are not written.
    pub fn attr(mut self, name: impl Into<String>, value: AttributeValue) -> Self {
        let name = name.into();
        match self.target.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.target.push((name, value)),
        }
        self
    }

    /// Sets several Target attributes.
    pub fn attrs(self, attributes: impl IntoIterator<Item = (String, AttributeValue)>) -> Self {
        attributes
            .into_iter()
            .fold(self, |builder, (name, value)| builder.attr(name, value))
    }

    /// Adds a Target `FormattedValues` entry (option labels and the like).
    pub fn formatted_value(mut self, name: impl Into<String>, label: impl Into<String>) -> Self {
        self.formatted_values.push((name.into(), label.into()));
        self
    }

    /// Makes the connection a Stakeholder row as added from the opportunity's subgrid (§9.2):
    /// record1 = opportunity, record2 = contact with `record2roleid`, master row.
    pub fn stakeholder(self, opportunity_id: Uuid, contact_id: Uuid, role_id: Uuid) -> Self {
        let own_id = self.record_id;
        self.attr("record1id", reference("opportunity", opportunity_id))
            .attr("record1objecttypecode", AttributeValue::OptionSet(3))
            .attr("record2id", reference("contact", contact_id))
            .attr("record2objecttypecode", AttributeValue::OptionSet(2))
            .attr("record2roleid", reference("connectionrole", role_id))
            // Points at itself until Dynamics back-fills the reciprocal row (§6.2).
            .attr("relatedconnectionid", reference("connection", own_id))
            .attr("ismaster", AttributeValue::Bool(true))
            .attr("statecode", AttributeValue::OptionSet(0))
            .attr("statuscode", AttributeValue::OptionSet(1))
    }

    /// Adds a post image under `alias` (in addition to `AsynchronousStepPrimaryName`).
    pub fn post_image(mut self, alias: impl Into<String>, attributes: Attributes) -> Self {
        self.post_images
            .push((alias.into(), attributes.into_iter().collect()));
        self
    }

    /// Adds a pre image under `alias`.
    pub fn pre_image(mut self, alias: impl Into<String>, attributes: Attributes) -> Self {
        self.pre_images
            .push((alias.into(), attributes.into_iter().collect()));
        self
    }

    /// Leaves out the automatic `AsynchronousStepPrimaryName` image (as a synchronous step).
    pub fn without_async_primary_name_image(mut self) -> Self {
        self.async_primary_name_image = false;
        self
    }

    /// `OperationId`; `None` writes the empty Guid, as synchronous steps have.
    pub fn operation_id(mut self, id: Option<Uuid>) -> Self {
        self.operation_id = id;
        self
    }
    pub fn correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = id;
        self
    }
    /// `RequestId`; `None` writes null, as the MS sample has.
    pub fn request_id(mut self, id: Option<Uuid>) -> Self {
        self.request_id = id;
        self
    }
    pub fn operation_created_on(mut self, ms: i64) -> Self {
        self.operation_created_on_ms = ms;
        self
    }
    pub fn stage(mut self, stage: i32) -> Self {
        self.stage = stage;
        self
    }
    /// `Mode`: 0 synchronous, 1 asynchronous.
    pub fn mode(mut self, mode: i32) -> Self {
        self.mode = mode;
        self
    }
    pub fn depth(mut self, depth: i32) -> Self {
        self.depth = depth;
        self
    }
    /// `OrganizationName` (body) and the `x-ms-dynamics-organization` domain (header).
    pub fn organization(mut self, unique_name: impl Into<String>, domain: impl Into<String>) -> Self {
        self.organization_name = unique_name.into();
        self.organization_domain = domain.into();
        self
    }
    /// `OrganizationId` (body).
    pub fn organization_id(mut self, id: Uuid) -> Self {
        self.organization_id = id;
        self
    }
    /// Adds the MainOperation (stage 30) ParentContext a UI-initiated change has.
    pub fn with_parent_context(mut self) -> Self {
        self.parent_context = true;
        self
    }
    /// The body as Dynamics sends it over 256 KB: no InputParameters, images or ParentContext,
    /// plus the size-exceeded header (§2).
    pub fn size_exceeded(mut self) -> Self {
        self.size_exceeded = true;
        self
    }

    pub fn record_id(&self) -> Uuid {
        self.record_id
    }

    /// The version the decoded event will carry (`modifiedon`, or OperationCreatedOn on Delete).
    pub fn version_ms(&self) -> Version {
        self.version_ms
    }

    /// The request headers Dynamics sends with this body (§2), authentication not included.
    pub fn headers(&self) -> Vec<(String, String)> {
        let mut headers = vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            (
                "x-ms-dynamics-organization".to_owned(),
                self.organization_domain.clone(),
            ),
            (
                "x-ms-dynamics-entity-name".to_owned(),
                self.entity.logical_name().to_owned(),
            ),
            (
                "x-ms-dynamics-request-name".to_owned(),
                self.message.name().to_owned(),
            ),
            (
                "x-ms-correlation-request-id".to_owned(),
                self.correlation_id.to_string(),
            ),
        ];
        if self.size_exceeded {
            headers.push((SIZE_EXCEEDED_HEADER.to_owned(), "true".to_owned()));
        }
        headers
    }

    /// The body, byte for byte in the DCJS format.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(4096);
        self.write_context(&mut out, self.stage, false);
        out
    }

    fn write_context(&self, out: &mut String, stage: i32, is_parent: bool) {
        let entity = self.entity.logical_name();
        let created_on = if is_parent {
            self.operation_created_on_ms.saturating_sub(1)
        } else {
            self.operation_created_on_ms
        };
        let operation_id = self.operation_id.unwrap_or_default();
        let omit_payload = self.size_exceeded && !is_parent;

        out.push('{');
        member_str(out, "BusinessUnitId", BUSINESS_UNIT_ID);
        member_str(out, "CorrelationId", &self.correlation_id.to_string());
        member_raw(out, "Depth", &self.depth.to_string());
        member_str(out, "InitiatingUserAzureActiveDirectoryObjectId", AAD_OBJECT_ID);
        member_str(out, "InitiatingUserId", USER_ID);
        if !omit_payload {
            key(out, "InputParameters");
            out.push('[');
            if self.message.is_state_change() {
                self.write_parameters(out);
                out.push(']');
                out.push(',');
            } else {
                kv_start(out, "Target");
                if self.message == MessageKind::Delete {
                    write_reference(out, entity, self.record_id, None);
                } else {
                    // The parent (MainOperation) Target holds only what the caller submitted.
                    let attrs: Vec<_> = if is_parent {
                        self.target
                            .iter()
                            .filter(|(n, _)| !matches!(n.as_str(), "modifiedon" | "createdon"))
                            .cloned()
                            .collect()
                    } else {
                        self.target.clone()
                    };
                    let formatted = if is_parent {
                        &[][..]
                    } else {
                        &self.formatted_values[..]
                    };
                    write_entity(out, entity, Some(self.record_id), &attrs, formatted, true);
                }
                out.push('}');
                if is_parent && self.message != MessageKind::Delete {
                    out.push(',');
                    kv_start(out, "SuppressDuplicateDetection");
                    out.push_str("false}");
                }
                out.push(']');
                out.push(',');
            }
        }
        member_raw(out, "IsExecutingOffline", "false");
        member_raw(
            out,
            "IsInTransaction",
            if self.mode == 0 { "true" } else { "false" },
        );
        member_raw(out, "IsOfflinePlayback", "false");
        member_raw(out, "IsolationMode", "1");
        member_str(out, "MessageName", self.message.name());
        member_raw(out, "Mode", &self.mode.to_string());
        member_str(out, "OperationCreatedOn", &format!("/Date({created_on}+0000)/"));
        member_str(out, "OperationId", &operation_id.to_string());
        member_str(out, "OrganizationId", &self.organization_id.to_string());
        member_str(out, "OrganizationName", &self.organization_name);
        key(out, "OutputParameters");
        if self.message == MessageKind::Create && stage == 40 {
            out.push('[');
            kv_start(out, "id");
            write_string(out, &self.record_id.to_string());
            out.push_str("}]");
        } else {
            out.push_str("[]");
        }
        out.push(',');
        key(out, "OwningExtension");
        out.push_str("{\"Id\":");
        let step_id = derived_uuid("step", &format!("{entity}|{}|{is_parent}", self.message.name()));
        write_string(out, &step_id.to_string());
        out.push_str(",\"KeyAttributes\":[],\"LogicalName\":\"sdkmessageprocessingstep\",\"Name\":");
        if is_parent {
            write_string(out, "ObjectModel Implementation");
        } else {
            write_string(out, &format!("{entity}:{} -> oppsync", self.message.name()));
        }
        out.push_str(",\"RowVersion\":null},");
        if !omit_payload {
            key(out, "ParentContext");
            if self.parent_context && !is_parent {
                self.write_context(out, 30, true);
            } else {
                out.push_str("null");
            }
            out.push(',');
            key(out, "PostEntityImages");
            let mut post: Vec<(String, Vec<(String, AttributeValue)>)> = Vec::new();
            if !is_parent {
                post.extend(self.post_images.iter().cloned());
                if self.async_primary_name_image {
                    post.push((
                        "AsynchronousStepPrimaryName".to_owned(),
                        self.primary_name_attrs(),
                    ));
                }
            }
            self.write_images(out, &post);
            out.push(',');
            key(out, "PreEntityImages");
            if is_parent {
                out.push_str("[]");
            } else {
                self.write_images(out, &self.pre_images);
            }
            out.push(',');
        }
        member_str(out, "PrimaryEntityId", &self.record_id.to_string());
        member_str(out, "PrimaryEntityName", entity);
        match self.request_id {
            Some(id) => member_str(out, "RequestId", &id.to_string()),
            None => member_raw(out, "RequestId", "null"),
        }
        member_str(out, "SecondaryEntityName", "none");
        key(out, "SharedVariables");
        if is_parent {
            out.push_str("[{\"key\":\"ChangedEntityTypes\",\"value\":[{\"__type\":\"KeyValuePairOfstringstring:#System.Collections.Generic\",\"key\":");
            write_string(out, entity);
            out.push_str(",\"value\":");
            write_string(out, self.message.name());
            out.push_str("}]}]");
        } else {
            out.push_str("[{\"key\":\"IsAutoTransact\",\"value\":true}]");
        }
        out.push(',');
        member_raw(out, "Stage", &stage.to_string());
        member_str(out, "UserAzureActiveDirectoryObjectId", AAD_OBJECT_ID);
        key(out, "UserId");
        write_string(out, USER_ID);
        out.push('}');
    }

    fn write_parameters(&self, out: &mut String) {
        for (i, (name, parameter)) in self.parameters.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            kv_start(out, name);
            match parameter {
                Parameter::Value(value) => write_value(out, value),
                Parameter::Entity {
                    logical_name,
                    attributes,
                } => write_entity(out, logical_name, None, attributes, &[], true),
            }
            out.push('}');
        }
    }

    /// The automatic image holds the primary name column (if the Target has it) and the id.
    fn primary_name_attrs(&self) -> Vec<(String, AttributeValue)> {
        let name_column = match self.entity {
            EntityKind::Contact => "fullname",
            EntityKind::Opportunity | EntityKind::Connection | EntityKind::Account => "name",
        };
        let mut attrs = Vec::new();
        if let Some((_, name)) = self.target.iter().find(|(n, _)| n == name_column) {
            attrs.push((name_column.to_owned(), name.clone()));
        }
        attrs.push((
            primary_key(self.entity).to_owned(),
            AttributeValue::String(self.record_id.to_string()),
        ));
        attrs
    }

    fn write_images(&self, out: &mut String, images: &[(String, Vec<(String, AttributeValue)>)]) {
        out.push('[');
        for (i, (alias, attrs)) in images.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            kv_start(out, alias);
            write_entity(
                out,
                self.entity.logical_name(),
                Some(self.record_id),
                attrs,
                &[],
                false,
            );
            out.push('}');
        }
        out.push(']');
    }
}

/// An `EntityReference` attribute value.
pub fn reference(logical_name: &str, id: Uuid) -> AttributeValue {
    AttributeValue::EntityReference(EntityRef {
        logical_name: logical_name.to_owned(),
        id,
        name: None,
    })
}

/// The primary key column of a table (`opportunityid`, …).
pub fn primary_key(entity: EntityKind) -> &'static str {
    match entity {
        EntityKind::Opportunity => "opportunityid",
        EntityKind::Connection => "connectionid",
        EntityKind::Contact => "contactid",
        EntityKind::Account => "accountid",
    }
}

/// The UTC instant `ms` milliseconds after the epoch (clamped to the representable range).
pub fn datetime_from_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(if ms < 0 {
        time::PrimitiveDateTime::MIN.assume_utc()
    } else {
        time::PrimitiveDateTime::MAX.assume_utc()
    })
}

const BUSINESS_UNIT_ID: &str = "e2b9dd85-e89e-e711-8122-000d3aa2331c";
const USER_ID: &str = "75c2dd85-e89e-e711-8122-000d3aa2331c";
const AAD_OBJECT_ID: &str = "3d280606-3712-4759-b6b9-7302f8d1a3b0";
/// `OrganizationId` of composed bodies unless set (the Dataverse simulator's WhoAmI answers it).
pub const DEFAULT_ORGANIZATION_ID: Uuid = Uuid::from_u128(0x4ef5b371_e89e_e711_8122_000d3aa2331c);
/// `x-ms-dynamics-organization` of composed bodies unless set.
pub const DEFAULT_ORGANIZATION_DOMAIN: &str = "contoso.crm.dynamics.com";

/// A random-looking but reproducible v4 Guid.
fn derived_uuid(purpose: &str, seed: &str) -> Uuid {
    let digest = Sha256::new()
        .chain_update(purpose.as_bytes())
        .chain_update(b"|")
        .chain_update(seed.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

// ---------------------------------------------------------------------------------------------
// DCJS writer.

fn key(out: &mut String, name: &str) {
    write_string(out, name);
    out.push(':');
}

fn member_str(out: &mut String, name: &str, value: &str) {
    key(out, name);
    write_string(out, value);
    out.push(',');
}

fn member_raw(out: &mut String, name: &str, value: &str) {
    key(out, name);
    out.push_str(value);
    out.push(',');
}

/// Opens a `{"key":…,"value":` item; the caller writes the value and the closing brace.
fn kv_start(out: &mut String, name: &str) {
    out.push_str("{\"key\":");
    write_string(out, name);
    out.push_str(",\"value\":");
}

fn type_hint(out: &mut String, type_name: &str) {
    out.push_str("\"__type\":");
    write_string(out, &format!("{type_name}:{CONTRACTS}"));
    out.push(',');
}

/// A JSON string as DCJS writes it: `/` as `\/`, control characters as `\u00xx`.
fn write_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' => out.push_str("\\/"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_entity(
    out: &mut String,
    logical_name: &str,
    id: Option<Uuid>,
    attributes: &[(String, AttributeValue)],
    formatted_values: &[(String, String)],
    with_type: bool,
) {
    out.push('{');
    if with_type {
        type_hint(out, "Entity");
    }
    key(out, "Attributes");
    out.push('[');
    for (i, (name, value)) in attributes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        kv_start(out, name);
        write_value(out, value);
        out.push('}');
    }
    out.push_str("],\"EntityState\":null,");
    key(out, "FormattedValues");
    out.push('[');
    for (i, (name, label)) in formatted_values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        kv_start(out, name);
        write_string(out, label);
        out.push('}');
    }
    out.push_str("],");
    key(out, "Id");
    write_string(out, &id.unwrap_or_default().to_string());
    out.push_str(",\"KeyAttributes\":[],");
    member_str(out, "LogicalName", logical_name);
    out.push_str("\"RelatedEntities\":[],\"RowVersion\":null}");
}

fn write_reference(out: &mut String, logical_name: &str, id: Uuid, name: Option<&str>) {
    out.push('{');
    type_hint(out, "EntityReference");
    member_str(out, "Id", &id.to_string());
    out.push_str("\"KeyAttributes\":[],");
    member_str(out, "LogicalName", logical_name);
    key(out, "Name");
    match name {
        Some(name) => write_string(out, name),
        None => out.push_str("null"),
    }
    out.push_str(",\"RowVersion\":null}");
}

/// A decimal as DCJS writes a .NET decimal; a scale-0 Decimal gets one fractional digit so it
/// reads back as a Decimal rather than an Int (the only deviation from the wire).
fn write_decimal(out: &mut String, value: Decimal, force_fraction: bool) {
    let _ = write!(out, "{value}");
    if force_fraction && value.scale() == 0 {
        out.push_str(".0");
    }
}

fn write_date(out: &mut String, at: OffsetDateTime) {
    let ms = at.unix_timestamp_nanos().div_euclid(1_000_000);
    write_string(out, &format!("/Date({ms})/"));
}

fn write_option(out: &mut String, value: i32) {
    out.push('{');
    type_hint(out, "OptionSetValue");
    let _ = write!(out, "\"Value\":{value}}}");
}

fn write_value(out: &mut String, value: &AttributeValue) {
    match value {
        AttributeValue::Null => out.push_str("null"),
        AttributeValue::String(s) => write_string(out, s),
        AttributeValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        AttributeValue::Int(i) => {
            let _ = write!(out, "{i}");
        }
        AttributeValue::Decimal(d) => write_decimal(out, *d, true),
        AttributeValue::Money(d) => {
            out.push('{');
            type_hint(out, "Money");
            out.push_str("\"Value\":");
            write_decimal(out, *d, false);
            out.push('}');
        }
        AttributeValue::OptionSet(v) => write_option(out, *v),
        AttributeValue::OptionSetCollection(values) => {
            out.push('[');
            for (i, v) in values.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_option(out, *v);
            }
            out.push(']');
        }
        AttributeValue::DateTime(at) => write_date(out, *at),
        AttributeValue::EntityReference(r) => {
            write_reference(out, &r.logical_name, r.id, r.name.as_deref());
        }
        AttributeValue::EntityCollection(entities) => write_collection(out, entities),
        AttributeValue::Other(json) => write_json(out, json),
    }
}

fn write_collection(out: &mut String, entities: &[Entity]) {
    out.push('{');
    type_hint(out, "EntityCollection");
    key(out, "Entities");
    out.push('[');
    for (i, entity) in entities.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let attrs: Vec<(String, AttributeValue)> = entity
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let formatted: Vec<(String, String)> = entity
            .formatted_values
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        write_entity(out, &entity.logical_name, entity.id, &attrs, &formatted, false);
    }
    out.push_str("],");
    let entity_name = entities.first().map_or("", |e| e.logical_name.as_str());
    member_str(out, "EntityName", entity_name);
    out.push_str(
        "\"MinActiveRowVersion\":null,\"MoreRecords\":false,\"PagingCookie\":null,\
         \"TotalRecordCount\":-1,\"TotalRecordCountLimitExceeded\":false}",
    );
}

fn write_json(out: &mut String, json: &serde_json::Value) {
    match json {
        serde_json::Value::String(s) => write_string(out, s),
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(out, item);
            }
            out.push(']');
        }
        serde_json::Value::Object(members) => {
            out.push('{');
            for (i, (name, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                key(out, name);
                write_json(out, item);
            }
            out.push('}');
        }
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::dynamics::wire::{DecodeError, decode_context, decode_notification};

    const OPP: &str = "a1f3c6d2-8b4e-ef11-8409-000d3a5b1c2d";
    const CONTACT: &str = "6d81597f-0f9f-e711-8122-000d3aa2331c";
    const ACCOUNT: &str = "b2c3d4e5-f6a7-8901-bcde-f12345678901";
    const VERSION: i64 = 1_736_942_400_000;

    fn id(text: &str) -> Uuid {
        Uuid::parse_str(text).unwrap()
    }

    fn dec(text: &str) -> Decimal {
        Decimal::from_str_exact(text).unwrap()
    }

    fn every_value_type() -> Vec<(String, AttributeValue)> {
        let party = Entity {
            logical_name: "activityparty".into(),
            id: Some(id(CONTACT)),
            attributes: [("partyid".to_owned(), reference("contact", id(CONTACT)))].into(),
            formatted_values: Default::default(),
        };
        vec![
            (
                "name".into(),
                AttributeValue::String("Contoso \"big\" deal / Q1\nline two".into()),
            ),
            ("isprivate".into(), AttributeValue::Bool(true)),
            ("closeprobability".into(), AttributeValue::Int(-60)),
            (
                "exchangerate".into(),
                AttributeValue::Decimal(dec("1.0000000000")),
            ),
            ("new_count".into(), AttributeValue::Decimal(dec("5"))),
            ("estimatedvalue".into(), AttributeValue::Money(dec("125000.00"))),
            ("actualvalue".into(), AttributeValue::Money(dec("7"))),
            ("salesstage".into(), AttributeValue::OptionSet(2)),
            (
                "new_interests".into(),
                AttributeValue::OptionSetCollection(vec![257_760_001, 257_760_002]),
            ),
            ("new_regions".into(), AttributeValue::OptionSetCollection(vec![])),
            (
                "estimatedclosedate".into(),
                AttributeValue::DateTime(datetime_from_ms(1_743_379_200_000)),
            ),
            (
                "new_founded".into(),
                AttributeValue::DateTime(datetime_from_ms(-2_208_988_800_123)),
            ),
            ("customerid".into(), reference("account", id(ACCOUNT))),
            (
                "parentcontactid".into(),
                AttributeValue::EntityReference(EntityRef {
                    logical_name: "contact".into(),
                    id: id(CONTACT),
                    name: Some("James Glynn".into()),
                }),
            ),
            ("description".into(), AttributeValue::Null),
            ("to".into(), AttributeValue::EntityCollection(vec![party])),
            (
                "new_blob".into(),
                AttributeValue::Other(serde_json::json!({"a": [1, "x/y"]})),
            ),
        ]
    }

    #[test]
    fn given_every_value_type_when_composed_and_decoded_then_values_round_trip() {
        let builder = NotificationBuilder::opportunity_update(id(OPP), VERSION).attrs(every_value_type());
        let e = decode_notification(builder.to_json().as_bytes(), false)
            .unwrap()
            .event;
        for (name, value) in every_value_type() {
            assert_eq!(e.attributes[&name], value, "{name}");
        }
        // Exact scale survives, not only the numeric value.
        let AttributeValue::Money(amount) = &e.attributes["estimatedvalue"] else {
            panic!()
        };
        assert_eq!(amount.to_string(), "125000.00");
        assert_eq!(e.version, VERSION);
        assert_eq!(e.record_id, id(OPP));
        assert_eq!(e.attributes["opportunityid"], AttributeValue::String(OPP.into()));
    }

    #[test]
    fn given_a_create_then_output_parameters_carry_the_id_and_the_primary_name_image_exists() {
        let builder = NotificationBuilder::opportunity_create(id(OPP), VERSION)
            .attr("name", AttributeValue::String("Contoso".into()))
            .attr("customerid", reference("contact", id(CONTACT)));
        let ctx = decode_context(builder.to_json().as_bytes()).unwrap();
        assert_eq!(
            ctx.output_parameters["id"],
            crate::dynamics::wire::ParameterValue::Value(AttributeValue::String(OPP.into()))
        );
        let image = ctx.post_image("AsynchronousStepPrimaryName").unwrap();
        assert_eq!(image.attributes["name"], AttributeValue::String("Contoso".into()));
        let n = ctx.into_notification(false).unwrap();
        assert_eq!(n.event.message, MessageKind::Create);
        assert_eq!(
            n.event.attributes["customerid"],
            reference("contact", id(CONTACT))
        );
        assert_eq!(
            n.event.attributes["createdon"],
            AttributeValue::DateTime(datetime_from_ms(VERSION))
        );
    }

    #[test]
    fn given_images_and_ids_when_decoded_then_they_are_where_the_builder_put_them() {
        let post: Attributes = [("name".to_owned(), AttributeValue::String("From image".into()))].into();
        let pre: Attributes = [("stepname".to_owned(), AttributeValue::String("2-Develop".into()))].into();
        let op = Uuid::from_u128(7);
        let corr = Uuid::from_u128(8);
        let builder = NotificationBuilder::opportunity_update(id(OPP), VERSION)
            .post_image("PostImage", post)
            .pre_image("PreImage", pre)
            .operation_id(Some(op))
            .correlation_id(corr)
            .request_id(None)
            .depth(3)
            .with_parent_context();
        let body = builder.to_json();
        let ctx = decode_context(body.as_bytes()).unwrap();
        assert_eq!(ctx.parent_context.as_ref().map(|p| p.stage), Some(30));
        assert!(ctx.post_image("PostImage").is_some() && ctx.pre_image("PreImage").is_some());
        let n = decode_notification(body.as_bytes(), false).unwrap();
        assert_eq!(
            n.event.attributes["name"],
            AttributeValue::String("From image".into())
        );
        assert_eq!(
            n.event.pre_image["stepname"],
            AttributeValue::String("2-Develop".into())
        );
        assert_eq!(n.event.operation_id, Some(op.to_string()));
        assert_eq!(n.event.correlation_id, Some(corr.to_string()));
        assert_eq!(n.event.request_id, None);
        assert_eq!(n.event.depth, 3);
        assert!(n.dedupe_key.contains(&format!("|op:{op}|")), "{}", n.dedupe_key);
        // Without an OperationId (synchronous step) the key falls back to the correlation.
        let sync = builder.operation_id(None).mode(0);
        let n = decode_notification(sync.to_json().as_bytes(), false).unwrap();
        assert!(
            n.dedupe_key.contains(&format!("|corr:{corr}|")),
            "{}",
            n.dedupe_key
        );
    }

    #[test]
    fn given_deletes_then_target_is_a_reference_and_the_version_is_operation_created_on() {
        let pre: Attributes = [("record1id".to_owned(), reference("opportunity", id(OPP)))].into();
        for builder in [
            NotificationBuilder::opportunity_delete(id(OPP), VERSION),
            NotificationBuilder::connection_delete(id(CONTACT), VERSION).pre_image("PreImage", pre.clone()),
        ] {
            let body = builder.to_json();
            assert!(body.contains("\"value\":{\"__type\":\"EntityReference:http:\\/\\/schemas"));
            let e = decode_notification(body.as_bytes(), false).unwrap().event;
            assert_eq!(e.message, MessageKind::Delete);
            assert_eq!(e.record_id, builder.record_id());
            assert_eq!(e.version, VERSION);
            assert!(e.attributes.is_empty());
            assert!(!e.data_missing);
        }
    }

    #[test]
    fn given_size_exceeded_then_payload_members_are_dropped_and_the_header_is_added() {
        let builder = NotificationBuilder::contact_update(id(CONTACT), VERSION)
            .attr("emailaddress1", AttributeValue::String("j@contoso.com".into()))
            .with_parent_context()
            .size_exceeded();
        let body = builder.to_json();
        for member in [
            "InputParameters",
            "PreEntityImages",
            "PostEntityImages",
            "ParentContext",
        ] {
            assert!(!body.contains(member), "{member} still present");
        }
        assert!(builder.headers().iter().any(|(k, _)| k == SIZE_EXCEEDED_HEADER));
        let e = decode_notification(body.as_bytes(), true).unwrap().event;
        assert!(e.data_missing);
        assert_eq!(
            (e.entity, e.record_id, e.version),
            (EntityKind::Contact, id(CONTACT), VERSION)
        );
    }

    #[test]
    fn headers_name_the_entity_message_correlation_and_organization() {
        let builder = NotificationBuilder::connection_create(id(OPP), VERSION)
            .organization("unqorg", "org.crm4.dynamics.com");
        let headers = builder.headers();
        let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!(get("x-ms-dynamics-entity-name"), Some("connection"));
        assert_eq!(get("x-ms-dynamics-request-name"), Some("Create"));
        assert_eq!(get("x-ms-dynamics-organization"), Some("org.crm4.dynamics.com"));
        let n = decode_notification(builder.to_json().as_bytes(), false).unwrap();
        assert_eq!(
            get("x-ms-correlation-request-id"),
            n.event.correlation_id.as_deref()
        );
        assert_eq!(n.organization_name.as_deref(), Some("unqorg"));
        assert_eq!(get(SIZE_EXCEEDED_HEADER), None);
    }

    #[test]
    fn the_body_follows_dcjs_conventions() {
        let body = NotificationBuilder::opportunity_update(id(OPP), VERSION)
            .attr("description", AttributeValue::String("a\nb".into()))
            .to_json();
        // Top-level members in alphabetical (ordinal) order; no ParentContext, so names are unique.
        let members = [
            "BusinessUnitId",
            "CorrelationId",
            "Depth",
            "InitiatingUserAzureActiveDirectoryObjectId",
            "InitiatingUserId",
            "InputParameters",
            "IsExecutingOffline",
            "IsInTransaction",
            "IsOfflinePlayback",
            "IsolationMode",
            "MessageName",
            "Mode",
            "OperationCreatedOn",
            "OperationId",
            "OrganizationId",
            "OrganizationName",
            "OutputParameters",
            "OwningExtension",
            "ParentContext",
            "PostEntityImages",
            "PreEntityImages",
            "PrimaryEntityId",
            "PrimaryEntityName",
            "RequestId",
            "SecondaryEntityName",
            "SharedVariables",
            "Stage",
            "UserAzureActiveDirectoryObjectId",
            "UserId",
        ];
        let mut sorted = members;
        sorted.sort_unstable();
        assert_eq!(members, sorted);
        let positions: Vec<usize> = members
            .iter()
            .map(|m| body.find(&format!("\"{m}\":")).unwrap_or_else(|| panic!("{m}")))
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        assert!(
            body.contains("\"__type\":\"Entity:http:\\/\\/schemas.microsoft.com\\/xrm\\/2011\\/Contracts\"")
        );
        assert!(body.contains(&format!("\"modifiedon\",\"value\":\"\\/Date({VERSION})\\/\"")));
        assert!(body.contains("\"a\\u000ab\""));
        assert!(!body.contains("http://"));
        // Images carry no __type.
        let image_start = body.find("\"PostEntityImages\":").unwrap();
        assert!(body[image_start..].starts_with(
            "\"PostEntityImages\":[{\"key\":\"AsynchronousStepPrimaryName\",\"value\":{\"Attributes\""
        ));
    }

    #[test]
    fn the_same_builder_calls_give_the_same_body() {
        let a = NotificationBuilder::contact_create(id(CONTACT), VERSION).to_json();
        let b = NotificationBuilder::contact_create(id(CONTACT), VERSION).to_json();
        let c = NotificationBuilder::contact_create(id(CONTACT), VERSION + 1).to_json();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn stakeholder_connections_decode_like_the_subgrid_fixture() {
        let role = Uuid::from_u128(9);
        let builder = NotificationBuilder::connection_create(Uuid::from_u128(1), VERSION).stakeholder(
            id(OPP),
            id(CONTACT),
            role,
        );
        let e = decode_notification(builder.to_json().as_bytes(), false)
            .unwrap()
            .event;
        assert_eq!(e.attributes["record1id"], reference("opportunity", id(OPP)));
        assert_eq!(e.attributes["record2id"], reference("contact", id(CONTACT)));
        assert_eq!(e.attributes["record2roleid"], reference("connectionrole", role));
        assert_eq!(e.attributes["ismaster"], AttributeValue::Bool(true));
    }

    #[test]
    fn unsupported_stage_and_message_are_reported_for_composed_bodies() {
        let pre_op = NotificationBuilder::opportunity_update(id(OPP), VERSION).stage(20);
        assert_eq!(
            decode_notification(pre_op.to_json().as_bytes(), false),
            Err(DecodeError::UnsupportedStage(20))
        );
        let account_delete =
            NotificationBuilder::new(EntityKind::Account, MessageKind::Delete, id(ACCOUNT), VERSION);
        assert!(matches!(
            decode_notification(account_delete.to_json().as_bytes(), false),
            Err(DecodeError::Unsupported { .. })
        ));
    }

    #[test]
    fn closes_and_state_changes_compose_as_their_requests_and_decode() {
        let win = NotificationBuilder::opportunity_close(
            id(OPP),
            VERSION,
            true,
            3,
            Some(dec("500.00")),
            Some(VERSION - 1),
        );
        let body = win.to_json();
        assert!(
            body.contains("\"key\":\"OpportunityClose\",\"value\":{\"__type\":\"Entity:"),
            "{body}"
        );
        assert!(!body.contains("\"Target\""), "a Win has no Target");
        assert!(
            win.headers()
                .contains(&("x-ms-dynamics-request-name".to_owned(), "Win".to_owned()))
        );
        let e = decode_notification(body.as_bytes(), false).unwrap().event;
        assert_eq!(
            (e.message, e.record_id, e.version),
            (MessageKind::Win, id(OPP), VERSION)
        );
        assert_eq!(e.attributes["actualvalue"], AttributeValue::Money(dec("500.00")));
        assert_eq!(
            e.attributes["actualclosedate"],
            AttributeValue::DateTime(datetime_from_ms(VERSION - 1))
        );
        let lose = NotificationBuilder::opportunity_close(id(OPP), VERSION, false, -1, None, None);
        let e = decode_notification(lose.to_json().as_bytes(), false)
            .unwrap()
            .event;
        assert_eq!(e.attributes["statecode"], AttributeValue::OptionSet(2));
        assert_eq!(e.attributes["statuscode"], AttributeValue::OptionSet(4));
        let set_state =
            NotificationBuilder::opportunity_set_state(id(OPP), VERSION, true, 0, 1).with_parent_context();
        let e = decode_notification(set_state.to_json().as_bytes(), false)
            .unwrap()
            .event;
        assert_eq!(e.message, MessageKind::SetStateDynamicEntity);
        assert_eq!(e.attributes["statecode"], AttributeValue::OptionSet(0));
        let org = Uuid::from_u128(5);
        let n = decode_notification(win.organization_id(org).to_json().as_bytes(), false).unwrap();
        assert_eq!(n.organization_id, Some(org.to_string()));
    }
}
