//! Parser of the RemoteExecutionContext JSON that Dynamics posts to a webhook
//! (specs/dynamics.md §1, §2, §10).
//!
//! The body is parsed once by serde into borrowed structs; attribute and parameter values are
//! kept as borrowed `RawValue`s and converted by hand, because DCJS encodes their type in a
//! `__type` member and because Money/Decimal numbers must stay exact (serde_json would round
//! them through `f64`; `arbitrary_precision` is not enabled).

use std::borrow::Cow;
use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::event::{DynamicsEvent, EntityKind, HANDLED, MessageKind, Version};
use super::value::{AttributeValue, Attributes, Entity, EntityRef};

/// `Stage` of a PostOperation step: the only stage oppsync accepts, because only there is the
/// change committed (specs/dynamics.md §1.1, §4).
pub const POST_OPERATION_STAGE: i32 = 40;

/// Bound on our own recursion over nested values (EntityCollection → Entity → attribute …).
/// serde_json already stops at 128 levels for the body; nested values are re-read from
/// `RawValue`s, so the bound is enforced here again explicitly.
const MAX_VALUE_DEPTH: usize = 32;

/// How many `ParentContext` levels [`decode_context`] follows. Real bodies have one or two.
const MAX_PARENT_DEPTH: usize = 8;

/// A decoded notification: the event plus what intake needs to store it.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub event: DynamicsEvent,
    /// Recognises a repeated delivery of the same notification.
    pub dedupe_key: String,
    pub stage: i32,
    /// `OrganizationId`: which Dataverse organisation sent it.
    pub organization_id: Option<String>,
    pub organization_name: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("the body is not valid JSON: {0}")]
    Malformed(String),
    #[error("the body is JSON but not a Dynamics execution context: {0}")]
    NotAContext(String),
    #[error("oppsync does not handle {message} of {entity}")]
    Unsupported { entity: String, message: String },
    #[error("oppsync only handles PostOperation steps (stage 40), not stage {0}")]
    UnsupportedStage(i32),
}

impl DecodeError {
    fn not_a_context(what: impl std::fmt::Display) -> Self {
        DecodeError::NotAContext(what.to_string())
    }
}

/// A value of `InputParameters`, `OutputParameters` or `SharedVariables`: either an `Entity`
/// (the `Target` of Create/Update) or any attribute-like value.
#[derive(Debug, Clone, PartialEq)]
pub enum ParameterValue {
    Entity(Entity),
    Value(AttributeValue),
}

/// The typed `RemoteExecutionContext` (specs/dynamics.md §1.1). Members oppsync has no use for
/// (user ids, `OwningExtension`, `IsInTransaction` …) are not kept.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ExecutionContext {
    pub message_name: String,
    pub primary_entity_name: String,
    pub primary_entity_id: Uuid,
    pub stage: i32,
    /// 0 synchronous, 1 asynchronous.
    pub mode: Option<i32>,
    pub depth: Option<i32>,
    pub correlation_id: Option<String>,
    pub operation_id: Option<String>,
    pub request_id: Option<String>,
    pub organization_id: Option<String>,
    pub organization_name: Option<String>,
    pub operation_created_on: Option<OffsetDateTime>,
    /// `None` when the member is absent (dropped for size, §2), as opposed to present and empty.
    pub input_parameters: Option<BTreeMap<String, ParameterValue>>,
    pub output_parameters: BTreeMap<String, ParameterValue>,
    pub shared_variables: BTreeMap<String, ParameterValue>,
    /// Images by alias, in wire order (a repeated alias replaces the earlier one in place).
    pub pre_images: Vec<(String, Entity)>,
    pub post_images: Vec<(String, Entity)>,
    /// Only filled by [`decode_context`]; a ParentContext that does not parse is dropped.
    pub parent_context: Option<Box<ExecutionContext>>,
}

impl ExecutionContext {
    /// `InputParameters["Target"]`, if present.
    pub fn target(&self) -> Option<&ParameterValue> {
        self.input_parameters.as_ref()?.get("Target")
    }

    /// The pre image registered under `alias`. Images are found by alias, never by position:
    /// async steps add their own `AsynchronousStepPrimaryName` image (§1.7).
    pub fn pre_image(&self, alias: &str) -> Option<&Entity> {
        self.pre_images.iter().find(|(a, _)| a == alias).map(|(_, e)| e)
    }

    /// The post image registered under `alias`.
    pub fn post_image(&self, alias: &str) -> Option<&Entity> {
        self.post_images.iter().find(|(a, _)| a == alias).map(|(_, e)| e)
    }

    /// Turns the context into the domain event. `size_exceeded` is the
    /// `x-ms-dynamics-msg-size-exceeded` header.
    pub fn into_notification(mut self, size_exceeded: bool) -> Result<Notification, DecodeError> {
        let (entity, message) = match (
            EntityKind::from_logical_name(&self.primary_entity_name),
            MessageKind::from_name(&self.message_name),
        ) {
            (Some(e), Some(m)) if HANDLED.contains(&(e, m)) => (e, m),
            _ => {
                return Err(DecodeError::Unsupported {
                    entity: self.primary_entity_name,
                    message: self.message_name,
                });
            }
        };
        if self.stage != POST_OPERATION_STAGE {
            return Err(DecodeError::UnsupportedStage(self.stage));
        }
        if message.is_state_change() {
            return self.into_state_change(entity, message, size_exceeded);
        }

        let mut record_id = self.primary_entity_id;
        let mut attributes = Attributes::new();
        let mut target_present = false;
        match self.target() {
            Some(ParameterValue::Entity(target)) => {
                target_present = true;
                if record_id.is_nil() {
                    record_id = target.id.unwrap_or(record_id);
                }
            }
            Some(ParameterValue::Value(AttributeValue::EntityReference(reference))) => {
                if message != MessageKind::Delete {
                    return Err(DecodeError::not_a_context(format!(
                        "the Target of {} is an EntityReference, not an Entity",
                        message.name()
                    )));
                }
                if record_id.is_nil() {
                    record_id = reference.id;
                }
            }
            Some(ParameterValue::Value(AttributeValue::Null)) | None => {}
            Some(ParameterValue::Value(_)) => {
                return Err(DecodeError::not_a_context(
                    "Target is neither Entity nor EntityReference",
                ));
            }
        }
        if record_id.is_nil() {
            return Err(DecodeError::not_a_context(
                "no record id (PrimaryEntityId is empty)",
            ));
        }

        let header = self.header();
        let ExecutionContext {
            mut input_parameters,
            pre_images,
            post_images,
            ..
        } = self;
        // Delete carries no row state: its Target is a reference and post images do not exist.
        if message != MessageKind::Delete {
            for (_, image) in post_images {
                attributes.extend(image.attributes);
            }
            if let Some(ParameterValue::Entity(target)) =
                input_parameters.as_mut().and_then(|p| p.remove("Target"))
            {
                // Target wins over the images: it is the change itself.
                attributes.extend(target.attributes);
            }
        }
        let mut pre_image = Attributes::new();
        for (_, image) in pre_images {
            pre_image.extend(image.attributes);
        }

        let version: Version = match attributes.get("modifiedon") {
            Some(AttributeValue::DateTime(at)) => epoch_ms(*at),
            Some(other) if !other.is_null() => {
                return Err(DecodeError::not_a_context(format!(
                    "modifiedon is not a date: {other:?}"
                )));
            }
            _ => match self.operation_created_on {
                Some(at) => epoch_ms(at),
                None => {
                    return Err(DecodeError::not_a_context(
                        "neither modifiedon nor OperationCreatedOn gives a version",
                    ));
                }
            },
        };

        let data_missing = size_exceeded
            || (matches!(message, MessageKind::Create | MessageKind::Update) && !target_present);
        Ok(header.notification(Change {
            entity,
            message,
            record_id,
            version,
            attributes,
            pre_image,
            data_missing,
        }))
    }

    /// Win / Lose (InputParameters `OpportunityClose` and `Status`) and SetState /
    /// SetStateDynamicEntity (`EntityMoniker`, `State`, `Status`) become a change of
    /// `statecode` / `statuscode` (and, for a close, `actualvalue` / `actualclosedate`), versioned
    /// by `OperationCreatedOn`: these messages carry no row, so no `modifiedon`.
    fn into_state_change(
        mut self,
        entity: EntityKind,
        message: MessageKind,
        size_exceeded: bool,
    ) -> Result<Notification, DecodeError> {
        let mut record_id = self.primary_entity_id;
        let mut attributes = Attributes::new();
        let parameters = self.input_parameters.as_ref().filter(|_| !size_exceeded);
        if let Some(parameters) = parameters {
            let option = |name: &str| -> Result<Option<i32>, DecodeError> {
                match parameters.get(name) {
                    None | Some(ParameterValue::Value(AttributeValue::Null)) => Ok(None),
                    Some(ParameterValue::Value(v)) => v.as_option_value().map(Some).ok_or_else(|| {
                        DecodeError::not_a_context(format!("{name} is not an OptionSetValue"))
                    }),
                    Some(ParameterValue::Entity(_)) => Err(DecodeError::not_a_context(format!(
                        "{name} is not an OptionSetValue"
                    ))),
                }
            };
            // A negative status asks for the state's default status reason.
            let status = option("Status")?.filter(|s| *s >= 0);
            match message {
                MessageKind::Win | MessageKind::Lose => {
                    let won = message == MessageKind::Win;
                    match parameters.get("OpportunityClose") {
                        Some(ParameterValue::Entity(close)) => {
                            if record_id.is_nil()
                                && let Some(opportunity) = close
                                    .attributes
                                    .get("opportunityid")
                                    .and_then(AttributeValue::as_entity_ref)
                            {
                                record_id = opportunity.id;
                            }
                            if let Some(revenue) = close.attributes.get("actualrevenue") {
                                attributes.insert("actualvalue".to_owned(), revenue.clone());
                            }
                            if let Some(end) = close.attributes.get("actualend") {
                                attributes.insert("actualclosedate".to_owned(), end.clone());
                            }
                        }
                        None | Some(ParameterValue::Value(AttributeValue::Null)) => {}
                        Some(ParameterValue::Value(_)) => {
                            return Err(DecodeError::not_a_context("OpportunityClose is not an Entity"));
                        }
                    }
                    // statecode 1 Won (default reason 3 Won), 2 Lost (default reason 4 Canceled).
                    let (state, default_status) = if won { (1, 3) } else { (2, 4) };
                    attributes.insert("statecode".to_owned(), AttributeValue::OptionSet(state));
                    attributes.insert(
                        "statuscode".to_owned(),
                        AttributeValue::OptionSet(status.unwrap_or(default_status)),
                    );
                }
                _ => {
                    match parameters.get("EntityMoniker") {
                        Some(ParameterValue::Value(AttributeValue::EntityReference(moniker)))
                            if record_id.is_nil() =>
                        {
                            record_id = moniker.id;
                        }
                        Some(ParameterValue::Value(AttributeValue::EntityReference(_))) | None => {}
                        Some(_) => {
                            return Err(DecodeError::not_a_context(
                                "EntityMoniker is not an EntityReference",
                            ));
                        }
                    }
                    let state = option("State")?.ok_or_else(|| {
                        DecodeError::not_a_context(format!("{} without State", message.name()))
                    })?;
                    attributes.insert("statecode".to_owned(), AttributeValue::OptionSet(state));
                    if let Some(status) = status {
                        attributes.insert("statuscode".to_owned(), AttributeValue::OptionSet(status));
                    }
                }
            }
        }
        if record_id.is_nil() {
            return Err(DecodeError::not_a_context(
                "no record id (PrimaryEntityId is empty)",
            ));
        }
        let version = self.operation_created_on.map(epoch_ms).ok_or_else(|| {
            DecodeError::not_a_context(format!("{} without OperationCreatedOn", message.name()))
        })?;
        let data_missing = parameters.is_none();
        Ok(self.header().notification(Change {
            entity,
            message,
            record_id,
            version,
            attributes,
            pre_image: Attributes::new(),
            data_missing,
        }))
    }
}

impl ExecutionContext {
    /// The members that go into every notification, whatever its message (taken out: the
    /// context is consumed by then).
    fn header(&mut self) -> Header {
        Header {
            correlation_id: self.correlation_id.take(),
            operation_id: self.operation_id.take(),
            request_id: self.request_id.take(),
            organization_id: self.organization_id.take(),
            organization_name: self.organization_name.take(),
            stage: self.stage,
            depth: self.depth,
        }
    }
}

/// What a notification changes, before the header's ids complete it.
struct Change {
    entity: EntityKind,
    message: MessageKind,
    record_id: Uuid,
    version: i64,
    attributes: Attributes,
    pre_image: Attributes,
    data_missing: bool,
}

/// The members of a context that go into every notification, whatever its message.
struct Header {
    correlation_id: Option<String>,
    operation_id: Option<String>,
    request_id: Option<String>,
    organization_id: Option<String>,
    organization_name: Option<String>,
    stage: i32,
    depth: Option<i32>,
}

impl Header {
    /// The event of `change` with the ids, and its dedupe key.
    fn notification(self, change: Change) -> Notification {
        let event = DynamicsEvent {
            entity: change.entity,
            message: change.message,
            record_id: change.record_id,
            version: change.version,
            attributes: change.attributes,
            pre_image: change.pre_image,
            data_missing: change.data_missing,
            correlation_id: self.correlation_id,
            operation_id: self.operation_id,
            request_id: self.request_id,
            // A missing Depth is taken as a direct call.
            depth: self.depth.unwrap_or(1),
        };
        // Why these parts: OperationId names the async System Job, so a Dynamics retry
        // (502/503/504, §4) or a re-run of the failed job carries the same one and maps to the
        // same key. RequestId / CorrelationId are fall-backs for synchronous steps, where
        // OperationId is empty. CorrelationId is shared by every change made in one user
        // operation (plugins, cascades), so entity, message, stage, record id and version are
        // part of the key too: two changes of one record in one correlation stay distinct.
        // One operation can still run a step twice with the same ids and `modifiedon` (an Update
        // of the status and other columns runs Update steps twice), so a digest of what the
        // notification changes ends the key: only an exact re-delivery maps to the same key.
        // The version (the time of the change) leads, so keys arrive almost in order: the
        // inbox's unique index then grows at its right edge, where a key led by a random GUID
        // would dirty a different index page for every notification of a group commit.
        let origin = [
            ("op", &event.operation_id),
            ("req", &event.request_id),
            ("corr", &event.correlation_id),
        ]
        .into_iter()
        .find_map(|(kind, id)| id.as_deref().map(|id| format!("{kind}:{id}")))
        .unwrap_or_else(|| "none".to_owned());
        let dedupe_key = format!(
            "{:013}|{origin}|{}|{}|{}|{}|{}",
            event.version,
            event.entity.logical_name(),
            event.message.name(),
            self.stage,
            event.record_id,
            content_digest(&event)
        );
        Notification {
            event,
            dedupe_key,
            stage: self.stage,
            organization_id: self.organization_id,
            organization_name: self.organization_name,
        }
    }
}

/// 16 hex digits of SHA-256 over what the event changes (its attributes, which hold the Target,
/// the post images and any message parameters, and the pre image) and whether its data is
/// missing. Attribute maps are ordered, so the same content always gives the same digest.
fn content_digest(event: &DynamicsEvent) -> String {
    use sha2::{Digest, Sha256};
    let content =
        serde_json::to_vec(&(&event.attributes, &event.pre_image, event.data_missing)).unwrap_or_default();
    Sha256::digest(&content)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Decodes a webhook body. `size_exceeded` is the `x-ms-dynamics-msg-size-exceeded` header.
///
/// Errors: `Malformed` for bytes that are not JSON (invalid UTF-8, truncated …), `NotAContext`
/// for JSON of the wrong shape, `Unsupported` / `UnsupportedStage` for contexts oppsync does
/// not handle.
pub fn decode_notification(body: &[u8], size_exceeded: bool) -> Result<Notification, DecodeError> {
    // ParentContext is validated as JSON but not converted: the event does not need it.
    parse_context(body_text(body)?, None)?.into_notification(size_exceeded)
}

/// Decodes the whole execution context, including `ParentContext` (tolerantly: a parent that
/// does not parse is dropped).
pub fn decode_context(body: &[u8]) -> Result<ExecutionContext, DecodeError> {
    parse_context(body_text(body)?, Some(0))
}

fn body_text(body: &[u8]) -> Result<&str, DecodeError> {
    // Checked up front: serde_json does not validate UTF-8 inside members it skips.
    let text =
        std::str::from_utf8(body).map_err(|e| DecodeError::Malformed(format!("invalid UTF-8: {e}")))?;
    // .NET writers may put a UTF-8 byte-order mark first; it is not part of the JSON.
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text))
}

fn epoch_ms(at: OffsetDateTime) -> i64 {
    // Fits: OffsetDateTime's range is ±9999 years.
    i64::try_from(at.unix_timestamp_nanos().div_euclid(1_000_000)).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Wire structs (borrowed).

/// One `{"key":…,"value":…}` item of a DCJS dictionary (§0.2). A missing `value` counts as null.
#[derive(Deserialize)]
struct WireKv<'a> {
    #[serde(borrow)]
    key: Cow<'a, str>,
    #[serde(borrow, default)]
    value: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WireContext<'a> {
    #[serde(borrow)]
    message_name: Cow<'a, str>,
    #[serde(borrow)]
    primary_entity_name: Cow<'a, str>,
    // Raw because hand-edited bodies wrap Guids as {"__type":"Guid:#System","__value":…}.
    #[serde(borrow)]
    primary_entity_id: &'a RawValue,
    stage: i32,
    #[serde(default)]
    mode: Option<i32>,
    #[serde(default)]
    depth: Option<i32>,
    #[serde(borrow, default)]
    correlation_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    operation_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    request_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    organization_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    organization_name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    operation_created_on: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input_parameters: Option<Vec<WireKv<'a>>>,
    #[serde(borrow, default)]
    output_parameters: Option<Vec<WireKv<'a>>>,
    #[serde(borrow, default)]
    shared_variables: Option<Vec<WireKv<'a>>>,
    #[serde(borrow, default)]
    pre_entity_images: Option<Vec<WireKv<'a>>>,
    #[serde(borrow, default)]
    post_entity_images: Option<Vec<WireKv<'a>>>,
    #[serde(borrow, default)]
    parent_context: Option<&'a RawValue>,
}

/// Any JSON object that appears as a value: typed (`__type`) or not. Only the members oppsync
/// reads are listed; the rest are skipped.
#[derive(Deserialize)]
struct WireObject<'a> {
    #[serde(rename = "__type", borrow, default)]
    type_hint: Option<Cow<'a, str>>,
    #[serde(rename = "__value", borrow, default)]
    wrapped: Option<&'a RawValue>,
    #[serde(rename = "Value", borrow, default)]
    value: Option<&'a RawValue>,
    #[serde(rename = "Id", borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(rename = "LogicalName", borrow, default)]
    logical_name: Option<Cow<'a, str>>,
    #[serde(rename = "Name", borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(rename = "Attributes", borrow, default)]
    attributes: Option<Vec<WireKv<'a>>>,
    #[serde(rename = "FormattedValues", borrow, default)]
    formatted_values: Option<Vec<WireKv<'a>>>,
    #[serde(rename = "Entities", borrow, default)]
    entities: Option<Vec<&'a RawValue>>,
}

fn parse_context(text: &str, parent_depth: Option<usize>) -> Result<ExecutionContext, DecodeError> {
    let wire: WireContext<'_> = serde_json::from_str(text).map_err(|e| classify(text, e))?;

    let primary_entity_id = match scalar_string(wire.primary_entity_id, 0)? {
        Some(id) => parse_guid(&id)?,
        None => return Err(DecodeError::not_a_context("PrimaryEntityId is null")),
    };

    let parent_context = match (parent_depth, wire.parent_context) {
        (Some(depth), Some(raw)) if depth < MAX_PARENT_DEPTH && raw.get() != "null" => {
            match parse_context(raw.get(), Some(depth + 1)) {
                Ok(parent) => Some(Box::new(parent)),
                Err(error) => {
                    tracing::debug!(%error, "ignoring a ParentContext that does not parse");
                    None
                }
            }
        }
        _ => None,
    };

    Ok(ExecutionContext {
        message_name: wire.message_name.into_owned(),
        primary_entity_name: wire.primary_entity_name.into_owned(),
        primary_entity_id,
        stage: wire.stage,
        mode: wire.mode,
        depth: wire.depth,
        correlation_id: optional_id("CorrelationId", wire.correlation_id)?,
        operation_id: optional_id("OperationId", wire.operation_id)?,
        request_id: optional_id("RequestId", wire.request_id)?,
        organization_id: optional_id("OrganizationId", wire.organization_id)?,
        organization_name: wire.organization_name.map(Cow::into_owned),
        operation_created_on: match wire.operation_created_on {
            Some(raw) => match convert_value(raw, 0)? {
                AttributeValue::DateTime(at) => Some(at),
                _ => None,
            },
            None => None,
        },
        input_parameters: wire.input_parameters.map(parameters).transpose()?,
        output_parameters: parameters(wire.output_parameters.unwrap_or_default())?,
        shared_variables: parameters(wire.shared_variables.unwrap_or_default())?,
        pre_images: images(wire.pre_entity_images.unwrap_or_default())?,
        post_images: images(wire.post_entity_images.unwrap_or_default())?,
        parent_context,
    })
}

/// Syntax, EOF and I/O problems mean the bytes are not JSON; data problems mean the JSON has the
/// wrong shape. serde stops at the first problem, which can be a shape problem in a body that is
/// also broken further on, so a shape error is confirmed by a plain syntax pass (error path only).
fn classify(text: &str, error: serde_json::Error) -> DecodeError {
    if error.classify() != serde_json::error::Category::Data {
        return DecodeError::Malformed(error.to_string());
    }
    match serde_json::from_str::<serde::de::IgnoredAny>(text) {
        Ok(_) => DecodeError::NotAContext(error.to_string()),
        Err(syntax) => DecodeError::Malformed(syntax.to_string()),
    }
}

fn nested<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Result<T, DecodeError> {
    // The text was already validated as JSON, so any error here is about shape.
    serde_json::from_str(raw.get()).map_err(|e| DecodeError::NotAContext(e.to_string()))
}

/// A Guid-like scalar: a string, null, or the wrapped `{"__type":"Guid:#System","__value":…}`.
/// Empty strings and the nil Guid count as absent (synchronous steps send an empty OperationId).
/// Anything else must be a Guid: these go into dedupe keys, the store and every log line, so a
/// megabyte "correlation id" is refused, not kept.
fn optional_id(field: &str, raw: Option<&RawValue>) -> Result<Option<String>, DecodeError> {
    let Some(raw) = raw else { return Ok(None) };
    let Some(id) = scalar_string(raw, 0)?.filter(|id| !id.is_empty()) else {
        return Ok(None);
    };
    match Uuid::parse_str(&id) {
        Ok(u) if u.is_nil() => Ok(None),
        Ok(_) => Ok(Some(id)),
        Err(_) => Err(DecodeError::not_a_context(format!(
            "{field} {:?} is not a Guid",
            id.chars().take(48).collect::<String>()
        ))),
    }
}

fn scalar_string(raw: &RawValue, depth: usize) -> Result<Option<String>, DecodeError> {
    match raw.get().as_bytes().first() {
        Some(b'"') => Ok(Some(nested::<Cow<'_, str>>(raw)?.into_owned())),
        Some(b'n') => Ok(None),
        Some(b'{') if depth < 1 => {
            let object: WireObject<'_> = nested(raw)?;
            match object.wrapped {
                Some(inner) => scalar_string(inner, depth + 1),
                None => Err(DecodeError::not_a_context("expected a string, found an object")),
            }
        }
        _ => Err(DecodeError::not_a_context(format!(
            "expected a string, found {}",
            raw.get()
        ))),
    }
}

fn parse_guid(text: &str) -> Result<Uuid, DecodeError> {
    Uuid::parse_str(text).map_err(|_| DecodeError::not_a_context(format!("{text:?} is not a Guid")))
}

/// Key/value items into a map. A repeated key replaces the earlier value (last wins), which is
/// also what the .NET collections would do on deserialisation.
fn parameters(items: Vec<WireKv<'_>>) -> Result<BTreeMap<String, ParameterValue>, DecodeError> {
    let mut map = BTreeMap::new();
    for item in items {
        let value = match item.value {
            Some(raw) => convert_parameter(raw, 0)?,
            None => ParameterValue::Value(AttributeValue::Null),
        };
        map.insert(item.key.into_owned(), value);
    }
    Ok(map)
}

fn images(items: Vec<WireKv<'_>>) -> Result<Vec<(String, Entity)>, DecodeError> {
    let mut list: Vec<(String, Entity)> = Vec::with_capacity(items.len());
    for item in items {
        let Some(raw) = item.value else {
            // An alias registered but without a row: nothing to merge.
            continue;
        };
        let object: WireObject<'_> = nested(raw)?;
        let entity = convert_entity(object, 1)?;
        match list.iter_mut().find(|(alias, _)| *alias == item.key) {
            Some(slot) => slot.1 = entity,
            None => list.push((item.key.into_owned(), entity)),
        }
    }
    Ok(list)
}

fn attributes(items: Vec<WireKv<'_>>, depth: usize) -> Result<Attributes, DecodeError> {
    let mut map = Attributes::new();
    for item in items {
        let value = match item.value {
            Some(raw) => convert_value(raw, depth)?,
            None => AttributeValue::Null,
        };
        // Last wins on a repeated key.
        map.insert(item.key.into_owned(), value);
    }
    Ok(map)
}

fn convert_entity(object: WireObject<'_>, depth: usize) -> Result<Entity, DecodeError> {
    let logical_name = object
        .logical_name
        .ok_or_else(|| DecodeError::not_a_context("an Entity without LogicalName"))?
        .into_owned();
    let id = match object.id {
        Some(raw) => match scalar_string(raw, 0)? {
            Some(text) => Some(parse_guid(&text)?),
            None => None,
        },
        None => None,
    };
    let mut formatted_values = BTreeMap::new();
    for item in object.formatted_values.unwrap_or_default() {
        if let Some(raw) = item.value
            && let Some(label) = scalar_string(raw, 1)?
        {
            formatted_values.insert(item.key.into_owned(), label);
        }
    }
    Ok(Entity {
        logical_name,
        id,
        attributes: attributes(object.attributes.unwrap_or_default(), depth + 1)?,
        formatted_values,
    })
}

fn convert_value(raw: &RawValue, depth: usize) -> Result<AttributeValue, DecodeError> {
    match convert_parameter(raw, depth)? {
        ParameterValue::Value(value) => Ok(value),
        // An Entity where an attribute is expected has no typed slot; keep it verbatim.
        ParameterValue::Entity(_) => Ok(AttributeValue::Other(nested(raw)?)),
    }
}

/// The converter of §10: dispatch on the JSON kind, then on the `__type` prefix.
fn convert_parameter(raw: &RawValue, depth: usize) -> Result<ParameterValue, DecodeError> {
    if depth > MAX_VALUE_DEPTH {
        return Err(DecodeError::not_a_context("values nested too deeply"));
    }
    let text = raw.get();
    let value = match text.as_bytes().first() {
        Some(b'n') => AttributeValue::Null,
        Some(b't') => AttributeValue::Bool(true),
        Some(b'f') => AttributeValue::Bool(false),
        Some(b'"') => string_value(nested::<Cow<'_, str>>(raw)?),
        Some(b'[') => {
            let items: Vec<&RawValue> = nested(raw)?;
            array_value(raw, &items, depth)?
        }
        Some(b'{') => return object_value(raw, nested(raw)?, depth),
        Some(_) => number_value(text)?,
        None => return Err(DecodeError::not_a_context("empty value")),
    };
    Ok(ParameterValue::Value(value))
}

fn object_value(raw: &RawValue, object: WireObject<'_>, depth: usize) -> Result<ParameterValue, DecodeError> {
    let type_name = object
        .type_hint
        .as_deref()
        .map(|hint| hint.split(':').next().unwrap_or(hint).to_owned());
    let value = match type_name.as_deref() {
        Some("Entity") => return Ok(ParameterValue::Entity(convert_entity(object, depth)?)),
        Some("EntityReference") => AttributeValue::EntityReference(convert_reference(object)?),
        Some("OptionSetValue") => AttributeValue::OptionSet(option_value(&object)?),
        Some("Money") => match object.value {
            Some(amount) => AttributeValue::Money(exact_decimal(amount.get())?),
            // `"Value":null` arrives as None too: a Money without an amount is a cleared column.
            None => AttributeValue::Null,
        },
        Some("EntityCollection") => {
            let mut entities = Vec::new();
            for item in object.entities.unwrap_or_default() {
                entities.push(convert_entity(nested(item)?, depth + 1)?);
            }
            AttributeValue::EntityCollection(entities)
        }
        // Hand-edited wrapped primitives (§1.4): {"__type":"Guid:#System","__value":…}.
        _ if object.wrapped.is_some() => match object.wrapped {
            Some(inner) => convert_value(inner, depth + 1)?,
            None => AttributeValue::Null,
        },
        Some(_) => AttributeValue::Other(nested(raw)?),
        // Images and OwningExtension carry no __type (§1.3): recognise them by their members.
        None if object.logical_name.is_some() && object.attributes.is_some() => {
            return Ok(ParameterValue::Entity(convert_entity(object, depth)?));
        }
        None if object.logical_name.is_some() && object.id.is_some() => {
            AttributeValue::EntityReference(convert_reference(object)?)
        }
        None => AttributeValue::Other(nested(raw)?),
    };
    Ok(ParameterValue::Value(value))
}

fn convert_reference(object: WireObject<'_>) -> Result<EntityRef, DecodeError> {
    let logical_name = object
        .logical_name
        .ok_or_else(|| DecodeError::not_a_context("an EntityReference without LogicalName"))?
        .into_owned();
    let id = match object.id {
        Some(raw) => scalar_string(raw, 0)?,
        None => None,
    }
    .ok_or_else(|| DecodeError::not_a_context("an EntityReference without Id"))?;
    Ok(EntityRef {
        logical_name,
        id: parse_guid(&id)?,
        name: object.name.map(Cow::into_owned),
    })
}

fn option_value(object: &WireObject<'_>) -> Result<i32, DecodeError> {
    object
        .value
        .and_then(|raw| raw.get().parse::<i32>().ok())
        .ok_or_else(|| DecodeError::not_a_context("OptionSetValue without an integer Value"))
}

/// A bare array of OptionSetValues is a multi-select picklist (§1.4); an empty array is taken as
/// an empty selection. Other arrays are kept verbatim.
fn array_value(raw: &RawValue, items: &[&RawValue], depth: usize) -> Result<AttributeValue, DecodeError> {
    let mut options = Vec::with_capacity(items.len());
    for item in items {
        match convert_value(item, depth + 1)? {
            AttributeValue::OptionSet(v) => options.push(v),
            _ => return Ok(AttributeValue::Other(nested(raw)?)),
        }
    }
    Ok(AttributeValue::OptionSetCollection(options))
}

fn string_value(text: Cow<'_, str>) -> AttributeValue {
    if let Some(at) = dcjs_date(&text).or_else(|| iso_date(&text)) {
        return AttributeValue::DateTime(at);
    }
    AttributeValue::String(text.into_owned())
}

/// `/Date(ms)/` or `/Date(ms±hhmm)/` (§1.5): the ms are UTC; the offset only records the zone
/// the .NET DateTime had and is not applied again. The ms may be negative. Anything that does
/// not fit the pattern stays a string (users can type such text).
fn dcjs_date(text: &str) -> Option<OffsetDateTime> {
    let inner = text.strip_prefix("/Date(")?.strip_suffix(")/")?;
    let digits_start = usize::from(inner.starts_with('-'));
    let digits_end = inner[digits_start..]
        .find(|c: char| !c.is_ascii_digit())
        .map_or(inner.len(), |i| i + digits_start);
    if digits_end == digits_start {
        return None;
    }
    let offset = &inner[digits_end..];
    let offset_ok = offset.is_empty()
        || (offset.len() == 5
            && (offset.starts_with('+') || offset.starts_with('-'))
            && offset[1..].bytes().all(|b| b.is_ascii_digit()));
    if !offset_ok {
        return None;
    }
    let ms: i64 = inner[..digits_end].parse().ok()?;
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

/// ISO 8601 / RFC 3339 timestamps, as some tools write them (§1.5). Cheap shape check first so
/// ordinary strings are not run through the parser.
fn iso_date(text: &str) -> Option<OffsetDateTime> {
    let b = text.as_bytes();
    if b.len() < 20 || b.len() > 40 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

/// Integers become `Int`; anything else `Decimal`, exactly as written (`125000.00` keeps its
/// scale).
fn number_value(text: &str) -> Result<AttributeValue, DecodeError> {
    if !text.contains(['.', 'e', 'E'])
        && let Ok(int) = text.parse::<i64>()
    {
        return Ok(AttributeValue::Int(int));
    }
    exact_decimal(text).map(AttributeValue::Decimal)
}

fn exact_decimal(text: &str) -> Result<Decimal, DecodeError> {
    let parsed = if text.contains(['e', 'E']) {
        Decimal::from_scientific(text)
    } else {
        // Exact first; more than 28 fractional digits (a float column's noise) rounds.
        Decimal::from_str_exact(text).or_else(|_| text.parse::<Decimal>())
    };
    parsed.map_err(|_| DecodeError::not_a_context(format!("{text} is not a decimal number")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const OPP_A1: &str = "a1f3c6d2-8b4e-ef11-8409-000d3a5b1c2d";
    const OPP_D3: &str = "d3b1e0a2-4c5f-ef11-8409-000d3a5b1c2d";
    const OPP_E4: &str = "e4c2f1b3-5d60-ef11-8409-000d3a5b1c2d";
    const CONTACT: &str = "6d81597f-0f9f-e711-8122-000d3aa2331c";
    const ACCOUNT: &str = "b2c3d4e5-f6a7-8901-bcde-f12345678901";
    const ROLE: &str = "9a3e6c1b-2d4f-4a5e-8b7c-0d1e2f3a4b5c";
    const CONN_MASTER: &str = "c0a80101-77d5-ef11-8eea-000d3a5b1c2d";
    const CONN_RECIPROCAL: &str = "c0a80102-77d5-ef11-8eea-000d3a5b1c2d";

    pub(crate) const FIXTURES: &[&str] = &[
        "connection-create-stakeholder.json",
        "opportunity-delete.json",
        "opportunity-update-async.json",
        "connection-create-reciprocal.json",
        "connection-delete.json",
        "connection-update-deactivate.json",
        "contact-update-parentcustomer.json",
        "opportunity-create-account-customer.json",
        "opportunity-create-contact-customer.json",
        "opportunity-delete-preimage.json",
        "opportunity-update-multiselect.json",
        "opportunity-update-negative-dates.json",
        "opportunity-update-offset-dates.json",
        "opportunity-update-size-exceeded.json",
        "opportunity-win.json",
        "opportunity-lose.json",
        "opportunity-setstatedynamicentity.json",
        "contact-delete.json",
        "account-update-name.json",
        "opportunity-update-sync-status.json",
        "opportunity-update-sync-columns.json",
    ];

    pub(crate) fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/dynamics/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn decode(name: &str) -> Notification {
        decode_notification(&fixture(name), false).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn dec(text: &str) -> Decimal {
        Decimal::from_str_exact(text).unwrap()
    }

    fn id(text: &str) -> Uuid {
        Uuid::parse_str(text).unwrap()
    }

    fn at_ms(ms: i64) -> AttributeValue {
        AttributeValue::DateTime(
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap(),
        )
    }

    fn reference(logical_name: &str, guid: &str) -> AttributeValue {
        AttributeValue::EntityReference(EntityRef {
            logical_name: logical_name.into(),
            id: id(guid),
            name: None,
        })
    }

    fn text(value: &str) -> AttributeValue {
        AttributeValue::String(value.into())
    }

    /// Replaces `from` by `to` in a fixture (which must contain it).
    fn edited(name: &str, from: &str, to: &str) -> Vec<u8> {
        let body = String::from_utf8(fixture(name)).unwrap();
        assert!(body.contains(from), "{name} lacks {from}");
        body.replacen(from, to, 1).into_bytes()
    }

    #[test]
    fn every_fixture_decodes() {
        for name in FIXTURES {
            decode(name);
            decode_context(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn given_async_opportunity_update_when_decoded_then_target_wins_over_post_images() {
        let n = decode("opportunity-update-async.json");
        let e = &n.event;
        assert_eq!(
            (e.entity, e.message),
            (EntityKind::Opportunity, MessageKind::Update)
        );
        assert_eq!(e.record_id, id(OPP_A1));
        assert_eq!(e.version, 1_736_942_400_000);
        assert!(!e.data_missing);
        assert_eq!(e.depth, 1);
        assert_eq!(n.stage, 40);
        assert_eq!(
            n.organization_name.as_deref(),
            Some("unq4ef5b371e89ee7118122000d3aa23")
        );
        // Money is exact, scale included.
        let Some(AttributeValue::Money(amount)) = e.attributes.get("estimatedvalue") else {
            panic!(
                "estimatedvalue is not Money: {:?}",
                e.attributes.get("estimatedvalue")
            );
        };
        assert_eq!(amount.to_string(), "125000.00");
        assert_eq!(
            e.attributes["exchangerate"],
            AttributeValue::Decimal(dec("1.0000000000"))
        );
        assert_eq!(
            e.attributes["exchangerate"].to_owned(),
            AttributeValue::Decimal(dec("1"))
        );
        assert_eq!(e.attributes["salesstage"], AttributeValue::OptionSet(2));
        assert_eq!(e.attributes["closeprobability"], AttributeValue::Int(60));
        assert_eq!(e.attributes["modifiedonbehalfby"], AttributeValue::Null);
        // From the PostImage only.
        assert_eq!(e.attributes["customerid"], reference("account", ACCOUNT));
        assert_eq!(e.attributes["estimatedclosedate"], at_ms(1_743_379_200_000));
        assert_eq!(
            e.attributes["description"],
            text("Renewal incl. 50 extra seats.\nDecision in Q1.")
        );
        assert_eq!(e.attributes["name"], text("Contoso - 500 seats renewal"));
        assert_eq!(
            e.pre_image["estimatedvalue"],
            AttributeValue::Money(dec("90000.00"))
        );
        assert_eq!(e.pre_image["stepname"], text("2-Develop"));
        assert_eq!(
            e.operation_id.as_deref(),
            Some("5b1d1b1a-79f1-4f98-8467-81a6347f8865")
        );
        assert_eq!(
            e.correlation_id.as_deref(),
            Some("9c1e7b2a-3f4d-4e5a-8b6c-7d8e9f0a1b2c")
        );
        assert_eq!(
            e.request_id.as_deref(),
            Some("7e6d5c4b-3a29-4817-9605-f4e3d2c1b0a9")
        );
        assert!(
            n.dedupe_key.starts_with(&format!(
                "1736942400000|op:5b1d1b1a-79f1-4f98-8467-81a6347f8865|opportunity|Update|40|{OPP_A1}|"
            )),
            "{}",
            n.dedupe_key
        );
        // The key ends in 16 hex digits of the content digest.
        let digest = n.dedupe_key.rsplit('|').next().unwrap();
        assert!(
            digest.len() == 16 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
            "{digest}"
        );
    }

    #[test]
    fn given_async_update_when_context_decoded_then_images_are_found_by_alias_not_position() {
        let ctx = decode_context(&fixture("opportunity-update-async.json")).unwrap();
        assert_eq!(ctx.post_images[0].0, "PostImage");
        let primary_name = ctx.post_image("AsynchronousStepPrimaryName").unwrap();
        assert_eq!(primary_name.attributes.len(), 2);
        assert!(
            ctx.post_image("PostImage")
                .unwrap()
                .attributes
                .contains_key("customerid")
        );
        assert!(ctx.pre_image("PreImage").is_some());
        assert!(ctx.pre_image("PostImage").is_none());
        let parent = ctx.parent_context.as_deref().unwrap();
        assert_eq!(parent.stage, 30);
        assert!(parent.parent_context.is_none());
        assert_eq!(
            parent.input_parameters.as_ref().unwrap()["SuppressDuplicateDetection"],
            ParameterValue::Value(AttributeValue::Bool(false))
        );
        assert!(matches!(
            parent.shared_variables["ChangedEntityTypes"],
            ParameterValue::Value(AttributeValue::Other(_))
        ));
        assert_eq!(ctx.operation_created_on.map(epoch_ms), Some(1_736_942_401_000));
    }

    #[test]
    fn given_the_aliases_swapped_when_decoded_then_the_event_is_the_same() {
        let body = String::from_utf8(fixture("opportunity-update-async.json")).unwrap();
        let swapped = body
            .replacen("\"PostImage\"", "\"__tmp\"", 1)
            .replacen("\"AsynchronousStepPrimaryName\"", "\"PostImage\"", 1)
            .replacen("\"__tmp\"", "\"AsynchronousStepPrimaryName\"", 1);
        let ctx = decode_context(swapped.as_bytes()).unwrap();
        assert_eq!(ctx.post_image("PostImage").unwrap().attributes.len(), 2);
        assert_eq!(
            decode_notification(swapped.as_bytes(), false)
                .unwrap()
                .event
                .attributes,
            decode("opportunity-update-async.json").event.attributes
        );
    }

    #[test]
    fn given_stakeholder_connection_create_when_decoded_then_both_sides_and_role_are_lookups() {
        let e = decode("connection-create-stakeholder.json").event;
        assert_eq!(
            (e.entity, e.message),
            (EntityKind::Connection, MessageKind::Create)
        );
        assert_eq!(e.record_id, id(CONN_MASTER));
        assert_eq!(e.version, 1_737_360_900_000);
        assert_eq!(e.attributes["record1id"], reference("opportunity", OPP_A1));
        assert_eq!(e.attributes["record2id"], reference("contact", CONTACT));
        assert_eq!(e.attributes["record2roleid"], reference("connectionrole", ROLE));
        assert_eq!(
            e.attributes["relatedconnectionid"],
            reference("connection", CONN_MASTER)
        );
        assert_eq!(e.attributes["ismaster"], AttributeValue::Bool(true));
        assert_eq!(
            e.attributes["record1objecttypecode"],
            AttributeValue::OptionSet(3)
        );
        assert_eq!(e.attributes["connectionid"], text(CONN_MASTER));
        assert!(e.pre_image.is_empty());
    }

    #[test]
    fn given_opportunity_delete_when_decoded_then_attributes_are_empty_and_pre_image_holds_the_row() {
        for (name, record, version) in [
            ("opportunity-delete.json", OPP_A1, 1_738_600_801_000),
            ("opportunity-delete-preimage.json", OPP_E4, 1_737_700_000_000),
        ] {
            let e = decode(name).event;
            assert_eq!(
                (e.entity, e.message),
                (EntityKind::Opportunity, MessageKind::Delete)
            );
            assert_eq!(e.record_id, id(record));
            // No modifiedon on a Delete: the version is OperationCreatedOn.
            assert_eq!(e.version, version, "{name}");
            assert!(e.attributes.is_empty());
            assert!(!e.data_missing);
            assert_eq!(e.pre_image["customerid"], reference("account", ACCOUNT));
            assert_eq!(
                e.pre_image["estimatedvalue"],
                AttributeValue::Money(dec("125000.00"))
            );
        }
    }

    #[test]
    fn given_delete_with_nil_primary_entity_id_when_decoded_then_record_id_comes_from_target() {
        let body = edited(
            "opportunity-delete.json",
            &format!("\"PrimaryEntityId\": \"{OPP_A1}\",\n  \"PrimaryEntityName\""),
            "\"PrimaryEntityId\": \"00000000-0000-0000-0000-000000000000\",\n  \"PrimaryEntityName\"",
        );
        assert_eq!(
            decode_notification(&body, false).unwrap().event.record_id,
            id(OPP_A1)
        );
    }

    #[test]
    fn given_opportunity_create_with_contact_customer_then_customer_is_a_contact_reference() {
        let n = decode("opportunity-create-contact-customer.json");
        let e = &n.event;
        assert_eq!(
            (e.entity, e.message),
            (EntityKind::Opportunity, MessageKind::Create)
        );
        assert_eq!(e.record_id, id(OPP_D3));
        assert_eq!(e.version, 1_737_450_000_000);
        assert_eq!(e.attributes["customerid"], reference("contact", CONTACT));
        assert_eq!(e.attributes["parentcontactid"], reference("contact", CONTACT));
        assert_eq!(
            e.attributes["estimatedvalue"],
            AttributeValue::Money(dec("2154.32"))
        );
        assert_eq!(e.attributes["statecode"], AttributeValue::OptionSet(0));
        assert_eq!(e.attributes["createdon"], at_ms(1_737_450_000_000));
        assert_eq!(e.attributes["name"], text("James Glynn - 20 seats"));
        let ctx = decode_context(&fixture("opportunity-create-contact-customer.json")).unwrap();
        assert_eq!(ctx.output_parameters["id"], ParameterValue::Value(text(OPP_D3)));
        let Some(ParameterValue::Entity(target)) = ctx.target() else {
            panic!("no Target")
        };
        assert_eq!(target.formatted_values["salesstage"], "Qualify");
        assert_eq!(target.id, Some(id(OPP_D3)));
    }

    #[test]
    fn given_opportunity_create_with_account_customer_then_customer_is_an_account_reference() {
        let e = decode("opportunity-create-account-customer.json").event;
        assert_eq!(e.record_id, id(OPP_E4));
        assert_eq!(e.attributes["customerid"], reference("account", ACCOUNT));
        assert_eq!(e.attributes["parentaccountid"], reference("account", ACCOUNT));
        assert!(!e.attributes.contains_key("parentcontactid"));
        let Some(AttributeValue::Money(amount)) = e.attributes.get("estimatedvalue") else {
            panic!()
        };
        assert_eq!(amount.to_string(), "125000.00");
    }

    #[test]
    fn given_multi_select_values_then_they_decode_as_option_set_collections() {
        let e = decode("opportunity-update-multiselect.json").event;
        assert_eq!(
            e.attributes["new_productinterest"],
            AttributeValue::OptionSetCollection(vec![257_760_001, 257_760_002])
        );
        assert_eq!(
            e.attributes["new_regions"],
            AttributeValue::OptionSetCollection(vec![])
        );
        assert_eq!(
            e.attributes["discountpercentage"],
            AttributeValue::Decimal(dec("12.50"))
        );
        assert_eq!(
            e.pre_image["new_productinterest"],
            AttributeValue::OptionSetCollection(vec![257_760_001])
        );
        assert_eq!(
            e.request_id.as_deref(),
            Some("7a8b9c0d-1e2f-4a3b-8c4d-5e6f7a8b9c0d")
        );
    }

    #[test]
    fn given_dates_with_offsets_then_the_milliseconds_are_utc_and_the_offset_is_not_applied() {
        let e = decode("opportunity-update-offset-dates.json").event;
        assert_eq!(e.version, 1_506_384_247_000);
        assert_eq!(e.attributes["estimatedclosedate"], at_ms(1_743_379_200_000));
        assert_eq!(e.attributes["actualclosedate"], at_ms(1_743_465_600_000));
        assert_eq!(e.request_id, None);
        let ctx = decode_context(&fixture("opportunity-update-offset-dates.json")).unwrap();
        assert_eq!(ctx.operation_created_on.map(epoch_ms), Some(1_506_409_448_000));
    }

    #[test]
    fn given_dates_before_1970_and_wrapped_forms_then_they_decode() {
        let e = decode("opportunity-update-negative-dates.json").event;
        assert_eq!(e.attributes["estimatedclosedate"], at_ms(-86_400_000));
        assert_eq!(e.attributes["actualclosedate"], at_ms(-2_208_988_800_000));
        assert_eq!(e.attributes["new_founded"], at_ms(-1_000));
        assert_eq!(e.attributes["new_legacyid"], text(ACCOUNT));
        assert_eq!(e.version, 1_737_600_000_000);
    }

    #[test]
    fn given_size_exceeded_notification_then_scalars_survive_and_data_is_missing() {
        let body = fixture("opportunity-update-size-exceeded.json");
        for header in [true, false] {
            let n = decode_notification(&body, header).unwrap();
            let e = &n.event;
            assert!(e.data_missing, "header {header}");
            assert_eq!(
                (e.entity, e.message),
                (EntityKind::Opportunity, MessageKind::Update)
            );
            assert_eq!(e.record_id, id(OPP_E4));
            assert_eq!(e.version, 1_737_800_000_000);
            assert!(e.attributes.is_empty() && e.pre_image.is_empty());
        }
        // The header alone marks a complete-looking body as missing data too.
        assert!(
            decode_notification(&fixture("opportunity-update-async.json"), true)
                .unwrap()
                .event
                .data_missing
        );
        let ctx = decode_context(&body).unwrap();
        assert!(ctx.input_parameters.is_none() && ctx.target().is_none());
    }

    #[test]
    fn given_create_with_empty_input_parameters_then_data_is_missing() {
        let body = edited(
            "connection-create-stakeholder.json",
            "\"InputParameters\": [",
            "\"InputParameters\": [], \"Ignored\": [",
        );
        let e = decode_notification(&body, false).unwrap().event;
        assert!(e.data_missing);
        // The AsynchronousStepPrimaryName image still contributes.
        assert_eq!(e.attributes["name"], text("James Glynn"));
    }

    #[test]
    fn given_reciprocal_connection_row_then_record1_is_the_contact_and_it_is_not_master() {
        let e = decode("connection-create-reciprocal.json").event;
        assert_eq!(
            (e.entity, e.message),
            (EntityKind::Connection, MessageKind::Create)
        );
        assert_eq!(e.record_id, id(CONN_RECIPROCAL));
        assert_eq!(e.attributes["record1id"], reference("contact", CONTACT));
        assert_eq!(e.attributes["record1roleid"], reference("connectionrole", ROLE));
        assert_eq!(e.attributes["record2id"], reference("opportunity", OPP_D3));
        assert_eq!(
            e.attributes["relatedconnectionid"],
            reference("connection", CONN_MASTER)
        );
        assert_eq!(e.attributes["ismaster"], AttributeValue::Bool(false));
    }

    #[test]
    fn given_connection_delete_then_the_pre_image_carries_both_sides_and_depth_is_two() {
        let e = decode("connection-delete.json").event;
        assert_eq!(
            (e.entity, e.message),
            (EntityKind::Connection, MessageKind::Delete)
        );
        assert_eq!(e.record_id, id(CONN_MASTER));
        assert_eq!(e.depth, 2);
        assert_eq!(e.version, 1_738_600_802_000);
        assert!(e.attributes.is_empty());
        assert_eq!(e.pre_image["record1id"], reference("opportunity", OPP_D3));
        assert_eq!(e.pre_image["record2roleid"], reference("connectionrole", ROLE));
    }

    #[test]
    fn given_connection_deactivation_then_statecode_is_inactive() {
        let e = decode("connection-update-deactivate.json").event;
        assert_eq!(
            (e.entity, e.message),
            (EntityKind::Connection, MessageKind::Update)
        );
        assert_eq!(e.attributes["statecode"], AttributeValue::OptionSet(1));
        assert_eq!(e.attributes["statuscode"], AttributeValue::OptionSet(2));
        assert_eq!(e.attributes["record2id"], reference("contact", CONTACT));
        assert_eq!(e.pre_image["statecode"], AttributeValue::OptionSet(0));
        assert_eq!(e.version, 1_737_900_000_000);
    }

    #[test]
    fn given_contact_update_then_parent_customer_and_email_are_read() {
        let n = decode("contact-update-parentcustomer.json");
        let e = &n.event;
        assert_eq!((e.entity, e.message), (EntityKind::Contact, MessageKind::Update));
        assert_eq!(e.record_id, id(CONTACT));
        assert_eq!(e.version, 1_506_384_247_000);
        assert_eq!(e.attributes["parentcustomerid"], reference("account", ACCOUNT));
        assert_eq!(e.attributes["emailaddress1"], text("james.glynn@contoso.com"));
        assert_eq!(e.attributes["fullname"], text("James Glynn (sample)"));
        assert_eq!(e.request_id, None);
        let ctx = decode_context(&fixture("contact-update-parentcustomer.json")).unwrap();
        assert_eq!(ctx.parent_context.as_ref().map(|p| p.stage), Some(30));
    }

    #[test]
    fn given_a_broken_parent_context_then_the_notification_still_decodes() {
        let body = edited(
            "opportunity-delete.json",
            "\"ParentContext\": {",
            "\"ParentContext\": {\"Stage\": \"x\", \"Nested\": {",
        );
        let body = String::from_utf8(body).unwrap().replacen(
            "\"UserId\": \"75c2dd85-e89e-e711-8122-000d3aa2331c\"\n  },",
            "\"UserId\": \"75c2dd85-e89e-e711-8122-000d3aa2331c\"\n  }},",
            1,
        );
        assert!(decode_context(body.as_bytes()).unwrap().parent_context.is_none());
        assert!(decode_notification(body.as_bytes(), false).is_ok());
    }

    #[test]
    fn given_bytes_that_are_not_json_then_malformed() {
        let truncated = &fixture("opportunity-update-async.json")[..500];
        for body in [
            &b""[..],
            b"{",
            b"not json",
            b"{\"Stage\": 40,}",
            truncated,
            b"{\"a\": \"\xff\xfe\"}",
            b"{} trailing",
        ] {
            assert!(
                matches!(decode_notification(body, false), Err(DecodeError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn given_invalid_utf8_in_an_ignored_member_then_malformed() {
        let mut body = fixture("opportunity-update-async.json");
        let at = body.windows(7).position(|w| w == b"Mozilla").unwrap();
        body[at] = 0xC0;
        assert!(matches!(
            decode_notification(&body, false),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn given_json_that_is_not_a_context_then_not_a_context() {
        let f = "opportunity-update-async.json";
        let cases: Vec<Vec<u8>> = vec![
            b"[]".to_vec(),
            b"42".to_vec(),
            b"{}".to_vec(),
            edited(f, "\"MessageName\": \"Update\"", "\"MessageName\": 7"),
            edited(f, "\"MessageName\": \"Update\"", "\"Message\": \"Update\""),
            edited(f, "\"Stage\": 40", "\"Stage\": \"40\""),
            edited(
                f,
                "\n  \"PrimaryEntityId\": \"a1f3",
                "\n  \"PrimaryEntityId\": \"zz",
            ),
            edited(
                f,
                "\n  \"PrimaryEntityName\": \"opportunity\"",
                "\n  \"PrimaryEntityName\": null",
            ),
            edited(
                f,
                "\n  \"PostEntityImages\": [",
                "\n  \"PostEntityImages\": {\"x\": 1}, \"Ignored\": [",
            ),
            edited(f, "{\"key\": \"stepname\", ", "{\"k\": \"stepname\", "),
            edited(f, "\"Value\": 2}", "\"Value\": \"two\"}"),
            edited(
                f,
                "\"Id\": \"b2c3d4e5-f6a7-8901-bcde-f12345678901\"",
                "\"Id\": 12",
            ),
            edited(f, "\"Value\": 125000.00", "\"Value\": \"a lot\""),
            edited(
                f,
                "\"\\/Date(1736942400000)\\/\"},\n          {\"key\": \"modifiedby\"",
                "\"x\"},\n          {\"key\": \"modifiedby\"",
            ),
        ];
        for (i, body) in cases.iter().enumerate() {
            let result = decode_notification(body, false);
            assert!(
                matches!(result, Err(DecodeError::NotAContext(_))),
                "case {i}: {result:?}"
            );
        }
    }

    #[test]
    fn given_unhandled_entity_or_message_then_unsupported() {
        let f = "opportunity-update-async.json";
        let lead = edited(
            f,
            "\"PrimaryEntityName\": \"opportunity\",\n  \"RequestId\"",
            "\"PrimaryEntityName\": \"lead\",\n  \"RequestId\"",
        );
        assert_eq!(
            decode_notification(&lead, false),
            Err(DecodeError::Unsupported {
                entity: "lead".into(),
                message: "Update".into()
            })
        );
        let merge = edited(
            f,
            "\"MessageName\": \"Update\",\n  \"Mode\"",
            "\"MessageName\": \"Merge\",\n  \"Mode\"",
        );
        assert!(matches!(
            decode_notification(&merge, false),
            Err(DecodeError::Unsupported { .. })
        ));
        let account_delete = edited(
            "account-update-name.json",
            "\"MessageName\": \"Update\",\n  \"Mode\"",
            "\"MessageName\": \"Delete\",\n  \"Mode\"",
        );
        assert_eq!(
            decode_notification(&account_delete, false),
            Err(DecodeError::Unsupported {
                entity: "account".into(),
                message: "Delete".into()
            })
        );
        let contact_win = edited(
            "contact-update-parentcustomer.json",
            "\"MessageName\": \"Update\",\n  \"Mode\"",
            "\"MessageName\": \"Win\",\n  \"Mode\"",
        );
        assert!(matches!(
            decode_notification(&contact_win, false),
            Err(DecodeError::Unsupported { .. })
        ));
    }

    #[test]
    fn given_a_win_then_the_opportunity_is_won_with_its_status_actual_value_and_close_date() {
        let n = decode("opportunity-win.json");
        let e = &n.event;
        assert_eq!((e.entity, e.message), (EntityKind::Opportunity, MessageKind::Win));
        assert_eq!(e.record_id, id(OPP_A1));
        // No modifiedon in a Win: OperationCreatedOn is the version.
        assert_eq!(e.version, 1_739_966_400_000);
        assert!(!e.data_missing);
        assert_eq!(e.attributes["statecode"], AttributeValue::OptionSet(1));
        assert_eq!(e.attributes["statuscode"], AttributeValue::OptionSet(3));
        assert_eq!(
            e.attributes["actualvalue"],
            AttributeValue::Money(dec("118500.00"))
        );
        assert_eq!(e.attributes["actualclosedate"], at_ms(1_739_923_200_000));
        assert_eq!(e.attributes.len(), 4, "{:?}", e.attributes);
        assert!(n.dedupe_key.contains("|opportunity|Win|40|"), "{}", n.dedupe_key);
    }

    #[test]
    fn given_a_lose_then_the_opportunity_is_lost_with_that_status_reason() {
        let e = decode("opportunity-lose.json").event;
        assert_eq!(e.message, MessageKind::Lose);
        assert_eq!(e.attributes["statecode"], AttributeValue::OptionSet(2));
        assert_eq!(e.attributes["statuscode"], AttributeValue::OptionSet(5));
        assert_eq!(e.attributes["actualvalue"], AttributeValue::Money(dec("0.00")));
        assert_eq!(e.version, 1_740_052_800_000);
    }

    #[test]
    fn given_a_default_status_or_no_primary_id_then_the_close_still_decodes() {
        let default_status = edited("opportunity-win.json", "\"Value\": 3", "\"Value\": -1");
        let e = decode_notification(&default_status, false).unwrap().event;
        assert_eq!(
            e.attributes["statuscode"],
            AttributeValue::OptionSet(3),
            "Won's default reason"
        );
        let lose_default = edited("opportunity-lose.json", "\"Value\": 5", "\"Value\": -1");
        let e = decode_notification(&lose_default, false).unwrap().event;
        assert_eq!(
            e.attributes["statuscode"],
            AttributeValue::OptionSet(4),
            "Lost's default reason"
        );
        let no_primary_id = edited(
            "opportunity-win.json",
            &format!("\"PrimaryEntityId\": \"{OPP_A1}\""),
            "\"PrimaryEntityId\": \"00000000-0000-0000-0000-000000000000\"",
        );
        assert_eq!(
            decode_notification(&no_primary_id, false)
                .unwrap()
                .event
                .record_id,
            id(OPP_A1),
            "from OpportunityClose.opportunityid"
        );
        // Over 256 KB the parameters are dropped: the row must be read.
        assert!(
            decode_notification(&fixture("opportunity-win.json"), true)
                .unwrap()
                .event
                .data_missing
        );
        let bad = edited(
            "opportunity-win.json",
            "\"key\": \"OpportunityClose\",\n      \"value\": {",
            "\"key\": \"OpportunityClose\",\n      \"value\": 5, \"x\": {",
        );
        assert!(matches!(
            decode_notification(&bad, false),
            Err(DecodeError::NotAContext(_))
        ));
    }

    #[test]
    fn given_set_state_dynamic_entity_then_state_and_status_change() {
        let n = decode("opportunity-setstatedynamicentity.json");
        let e = &n.event;
        assert_eq!(e.message, MessageKind::SetStateDynamicEntity);
        assert_eq!(e.record_id, id(OPP_A1));
        assert_eq!(e.version, 1_740_139_200_000);
        assert_eq!(e.attributes["statecode"], AttributeValue::OptionSet(0));
        assert_eq!(e.attributes["statuscode"], AttributeValue::OptionSet(1));
        let set_state = edited(
            "opportunity-setstatedynamicentity.json",
            "\"MessageName\": \"SetStateDynamicEntity\"",
            "\"MessageName\": \"SetState\"",
        );
        assert_eq!(
            decode_notification(&set_state, false).unwrap().event.message,
            MessageKind::SetState
        );
        let without_state = edited(
            "opportunity-setstatedynamicentity.json",
            "\"key\": \"State\"",
            "\"key\": \"NotState\"",
        );
        assert!(matches!(
            decode_notification(&without_state, false),
            Err(DecodeError::NotAContext(_))
        ));
    }

    #[test]
    fn given_contact_delete_and_account_update_then_they_decode() {
        let e = decode("contact-delete.json").event;
        assert_eq!((e.entity, e.message), (EntityKind::Contact, MessageKind::Delete));
        assert_eq!(e.record_id, id(CONTACT));
        assert!(e.attributes.is_empty());
        let e = decode("account-update-name.json").event;
        assert_eq!((e.entity, e.message), (EntityKind::Account, MessageKind::Update));
        assert_eq!(e.record_id, id(ACCOUNT));
        assert_eq!(e.attributes["name"], text("Contoso Pharmaceuticals"));
        assert_eq!(e.version, 1_740_312_000_000);
    }

    #[test]
    fn given_one_operation_running_a_step_twice_then_both_changes_get_their_own_key() {
        // Microsoft documents that an Update of the status and other columns runs Update steps
        // twice; synchronous runs share OperationId (= RequestId) and modifiedon.
        let status = decode("opportunity-update-sync-status.json");
        let columns = decode("opportunity-update-sync-columns.json");
        assert_eq!(status.event.operation_id, columns.event.operation_id);
        assert_eq!(status.event.version, columns.event.version);
        assert_ne!(status.dedupe_key, columns.dedupe_key);
        let (a, b) = (&status.dedupe_key, &columns.dedupe_key);
        assert_eq!(
            a[..a.rfind('|').unwrap()],
            b[..b.rfind('|').unwrap()],
            "only the digest differs"
        );
        // An exact re-delivery keeps its key.
        assert_eq!(
            decode("opportunity-update-sync-columns.json").dedupe_key,
            columns.dedupe_key
        );
        // What only describes the delivery (user agent, step name) is not content.
        let other_step = edited(
            "opportunity-update-sync-columns.json",
            "opportunity:Update -> oppsync",
            "opportunity:Update -> renamed step",
        );
        assert_eq!(
            decode_notification(&other_step, false).unwrap().dedupe_key,
            columns.dedupe_key
        );
        // A pre image is content too.
        let with_pre = edited(
            "opportunity-update-sync-columns.json",
            "\"PreEntityImages\": [],",
            "\"PreEntityImages\": [{\"key\": \"PreImage\", \"value\": {\"Attributes\": [{\"key\": \"name\", \"value\": \"old\"}], \"LogicalName\": \"opportunity\"}}],",
        );
        assert_ne!(
            decode_notification(&with_pre, false).unwrap().dedupe_key,
            columns.dedupe_key
        );
    }

    #[test]
    fn given_a_byte_order_mark_before_the_json_then_it_decodes() {
        let mut body = "\u{feff}".as_bytes().to_vec();
        body.extend(fixture("opportunity-win.json"));
        assert_eq!(
            decode_notification(&body, false).unwrap(),
            decode("opportunity-win.json")
        );
        assert!(decode_context(&body).is_ok());
        // Only one, and only first.
        let mut twice = "\u{feff}".as_bytes().to_vec();
        twice.extend(&body);
        assert!(matches!(
            decode_notification(&twice, false),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn given_a_stage_other_than_post_operation_then_unsupported_stage() {
        for stage in [10, 20, 30] {
            let body = edited(
                "opportunity-update-async.json",
                "\"Stage\": 40",
                &format!("\"Stage\": {stage}"),
            );
            assert_eq!(
                decode_notification(&body, false),
                Err(DecodeError::UnsupportedStage(stage))
            );
        }
    }

    #[test]
    fn given_an_update_whose_target_is_a_reference_then_not_a_context() {
        let body = edited(
            "opportunity-delete.json",
            "\"MessageName\": \"Delete\",\n  \"Mode\"",
            "\"MessageName\": \"Update\",\n  \"Mode\"",
        );
        assert!(matches!(
            decode_notification(&body, false),
            Err(DecodeError::NotAContext(_))
        ));
    }

    #[test]
    fn given_a_repeated_attribute_key_then_the_last_wins() {
        let body = edited(
            "opportunity-update-async.json",
            "{\"key\": \"stepname\", \"value\": \"3-Propose\"},",
            "{\"key\": \"stepname\", \"value\": \"first\"}, {\"key\": \"stepname\", \"value\": \"last\"},",
        );
        let e = decode_notification(&body, false).unwrap().event;
        assert_eq!(e.attributes["stepname"], text("last"));
    }

    #[test]
    fn given_neither_modifiedon_nor_operation_created_on_then_not_a_context() {
        let body = edited(
            "opportunity-update-size-exceeded.json",
            "\"OperationCreatedOn\": \"\\/Date(1737800000000+0000)\\/\",",
            "",
        );
        assert!(matches!(
            decode_notification(&body, false),
            Err(DecodeError::NotAContext(_))
        ));
    }

    #[test]
    fn given_the_same_body_twice_then_the_dedupe_key_is_the_same() {
        for name in FIXTURES {
            assert_eq!(decode(name).dedupe_key, decode(name).dedupe_key);
        }
    }

    #[test]
    fn given_two_changes_of_one_record_in_one_correlation_then_dedupe_keys_differ() {
        let f = "opportunity-update-async.json";
        let first = decode(f);
        let later = decode_notification(
            &edited(
                f,
                "{\"key\": \"modifiedon\", \"value\": \"\\/Date(1736942400000)\\/\"}",
                "{\"key\": \"modifiedon\", \"value\": \"\\/Date(1736942460000)\\/\"}",
            ),
            false,
        )
        .unwrap();
        assert_eq!(first.event.correlation_id, later.event.correlation_id);
        assert_ne!(first.dedupe_key, later.dedupe_key);
        // Keys follow the time of the change, so the inbox index grows at one end.
        assert!(first.dedupe_key < later.dedupe_key);
    }

    #[test]
    fn given_no_operation_id_then_the_dedupe_key_falls_back_to_request_then_correlation() {
        let f = "opportunity-update-offset-dates.json"; // RequestId is null here
        let empty = edited(
            f,
            "\"OperationId\": \"9c0d1e2f-3a4b-4c5d-8e6f-7a8b9c0d1e2f\"",
            "\"OperationId\": \"00000000-0000-0000-0000-000000000000\"",
        );
        let n = decode_notification(&empty, false).unwrap();
        assert_eq!(n.event.operation_id, None);
        assert!(
            n.dedupe_key
                .contains("|corr:8b9c0d1e-2f3a-4b4c-9d5e-6f7a8b9c0d1e|opportunity|Update|40|"),
            "{}",
            n.dedupe_key
        );
        let m = decode("opportunity-update-multiselect.json");
        assert!(m.dedupe_key.contains("|op:6f7a8b9c-"), "{}", m.dedupe_key);
    }

    #[test]
    fn numbers_are_ints_when_integral_and_exact_decimals_otherwise() {
        assert_eq!(number_value("60"), Ok(AttributeValue::Int(60)));
        assert_eq!(number_value("-7"), Ok(AttributeValue::Int(-7)));
        assert_eq!(
            number_value("2365.12"),
            Ok(AttributeValue::Decimal(dec("2365.12")))
        );
        assert_eq!(number_value("1e3"), Ok(AttributeValue::Decimal(dec("1000"))));
        assert_eq!(
            number_value("99999999999999999999"),
            Ok(AttributeValue::Decimal(dec("99999999999999999999")))
        );
        assert!(number_value("1e400").is_err());
        let Ok(AttributeValue::Decimal(d)) = number_value("0.30000000000000004") else {
            panic!()
        };
        assert_eq!(d.to_string(), "0.30000000000000004");
    }

    #[test]
    fn dates_parse_in_dcjs_and_iso_forms_and_odd_strings_stay_strings() {
        assert_eq!(string_value("/Date(0)/".into()), at_ms(0));
        assert_eq!(
            string_value("/Date(1506409448000-0700)/".into()),
            at_ms(1_506_409_448_000)
        );
        assert_eq!(string_value("/Date(-1-0100)/".into()), at_ms(-1));
        assert_eq!(
            string_value("2025-09-17T03:25:10.000Z".into()),
            at_ms(1_758_079_510_000)
        );
        for odd in [
            "/Date()/",
            "/Date(12)",
            "/Date(1+01)/",
            "/Date(99999999999999999999)/",
            "2025-13-45T99:00:00Z",
            "Date(1)",
        ] {
            assert_eq!(string_value(odd.into()), text(odd));
        }
    }

    #[test]
    fn deeply_nested_values_are_refused_without_panicking() {
        let mut value = String::from("1");
        for _ in 0..100 {
            value = format!("[{value}]");
        }
        let body = edited(
            "opportunity-update-async.json",
            "{\"key\": \"closeprobability\", \"value\": 60}",
            &format!("{{\"key\": \"closeprobability\", \"value\": {value}}}"),
        );
        assert!(decode_notification(&body, false).is_err());
        let mut entity = String::from("null");
        for _ in 0..40 {
            entity = format!(
                "{{\"__type\":\"EntityCollection:x\",\"Entities\":[{{\"LogicalName\":\"a\",\"Attributes\":[{{\"key\":\"k\",\"value\":{entity}}}]}}]}}"
            );
        }
        let body = edited(
            "opportunity-update-async.json",
            "{\"key\": \"closeprobability\", \"value\": 60}",
            &format!("{{\"key\": \"closeprobability\", \"value\": {entity}}}"),
        );
        assert!(matches!(
            decode_notification(&body, false),
            Err(DecodeError::NotAContext(_)) | Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn entity_collections_decode_into_entities() {
        let collection = r#"{"__type":"EntityCollection:http:\/\/schemas.microsoft.com\/xrm\/2011\/Contracts","Entities":[{"Attributes":[{"key":"partyid","value":{"__type":"EntityReference:x","Id":"6d81597f-0f9f-e711-8122-000d3aa2331c","KeyAttributes":[],"LogicalName":"contact","Name":null,"RowVersion":null}}],"EntityState":null,"FormattedValues":[],"Id":"00000000-0000-0000-0000-000000000000","KeyAttributes":[],"LogicalName":"activityparty","RelatedEntities":[],"RowVersion":null}],"EntityName":"activityparty","MoreRecords":false}"#;
        let body = edited(
            "opportunity-update-async.json",
            "{\"key\": \"closeprobability\", \"value\": 60}",
            &format!("{{\"key\": \"to\", \"value\": {collection}}}"),
        );
        let e = decode_notification(&body, false).unwrap().event;
        let AttributeValue::EntityCollection(parties) = &e.attributes["to"] else {
            panic!("{:?}", e.attributes["to"])
        };
        assert_eq!(parties[0].logical_name, "activityparty");
        assert_eq!(parties[0].attributes["partyid"], reference("contact", CONTACT));
    }

    mod never_panics {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::Bool),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(serde_json::Value::from),
                prop_oneof![
                    "[a-zA-Z0-9 /()+-]{0,12}",
                    Just("/Date(-1-0700)/".to_owned()),
                    Just("6d81597f-0f9f-e711-8122-000d3aa2331c".to_owned()),
                    Just("opportunity".to_owned()),
                    Just("Update".to_owned()),
                ]
                .prop_map(serde_json::Value::String),
            ];
            let keys = prop_oneof![
                Just("MessageName".to_owned()),
                Just("PrimaryEntityName".to_owned()),
                Just("PrimaryEntityId".to_owned()),
                Just("Stage".to_owned()),
                Just("InputParameters".to_owned()),
                Just("PostEntityImages".to_owned()),
                Just("key".to_owned()),
                Just("value".to_owned()),
                Just("__type".to_owned()),
                Just("Value".to_owned()),
                Just("LogicalName".to_owned()),
                Just("Attributes".to_owned()),
                "[a-z]{1,4}",
            ];
            leaf.prop_recursive(6, 64, 8, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                    prop::collection::btree_map(keys.clone(), inner, 0..6)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn random_bytes_are_refused(body in prop::collection::vec(any::<u8>(), 0..512), flag: bool) {
                let result = decode_notification(&body, flag);
                prop_assert!(matches!(result, Err(DecodeError::Malformed(_)) | Err(DecodeError::NotAContext(_))), "{result:?}");
            }

            #[test]
            fn random_json_never_panics(value in json_value(), flag: bool) {
                let body = serde_json::to_vec(&value).unwrap();
                let _ = decode_notification(&body, flag);
                let _ = decode_context(&body);
            }

            #[test]
            fn truncated_fixtures_are_malformed(index in 0..FIXTURES.len(), cut in any::<prop::sample::Index>()) {
                let body = fixture(FIXTURES[index]);
                // Keep at least one byte short of the closing brace.
                let content = body.iter().rposition(|b| *b == b'}').unwrap();
                let end = cut.index(content);
                let result = decode_notification(&body[..end], false);
                prop_assert!(matches!(result, Err(DecodeError::Malformed(_))), "{} cut at {end}: {result:?}", FIXTURES[index]);
            }

            #[test]
            fn mutated_fixtures_never_panic(
                index in 0..FIXTURES.len(),
                edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                flag: bool,
            ) {
                let mut body = fixture(FIXTURES[index]);
                for (at, byte) in &edits {
                    let i = at.index(body.len());
                    body[i] = *byte;
                }
                let _ = decode_notification(&body, flag);
                let _ = decode_context(&body);
            }
        }
    }
}
