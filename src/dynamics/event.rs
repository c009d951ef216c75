//! The small domain event a Dynamics notification turns into. Everything downstream of intake
//! (the rules, the worker) works on these, never on the raw wire format.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::value::Attributes;

/// Milliseconds since the Unix epoch: the row's `modifiedon`, else the context's
/// `OperationCreatedOn`. Newer wins, per field.
pub type Version = i64;

/// The tables oppsync handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntityKind {
    Opportunity,
    Connection,
    Contact,
}

impl EntityKind {
    pub fn logical_name(self) -> &'static str {
        match self {
            EntityKind::Opportunity => "opportunity",
            EntityKind::Connection => "connection",
            EntityKind::Contact => "contact",
        }
    }

    pub fn from_logical_name(name: &str) -> Option<Self> {
        match name {
            "opportunity" => Some(EntityKind::Opportunity),
            "connection" => Some(EntityKind::Connection),
            "contact" => Some(EntityKind::Contact),
            _ => None,
        }
    }
}

/// The messages oppsync handles (Assign and SetState arrive as Update in current Dataverse).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    Create,
    Update,
    Delete,
}

impl MessageKind {
    pub fn name(self) -> &'static str {
        match self {
            MessageKind::Create => "Create",
            MessageKind::Update => "Update",
            MessageKind::Delete => "Delete",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "Create" => Some(MessageKind::Create),
            "Update" => Some(MessageKind::Update),
            "Delete" => Some(MessageKind::Delete),
            _ => None,
        }
    }
}

/// (entity, message) pairs oppsync accepts; anything else is answered 422.
pub const HANDLED: &[(EntityKind, MessageKind)] = &[
    (EntityKind::Opportunity, MessageKind::Create),
    (EntityKind::Opportunity, MessageKind::Update),
    (EntityKind::Opportunity, MessageKind::Delete),
    (EntityKind::Connection, MessageKind::Create),
    (EntityKind::Connection, MessageKind::Update),
    (EntityKind::Connection, MessageKind::Delete),
    (EntityKind::Contact, MessageKind::Create),
    (EntityKind::Contact, MessageKind::Update),
];

/// One change of one Dynamics row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DynamicsEvent {
    pub entity: EntityKind,
    pub message: MessageKind,
    /// `PrimaryEntityId`.
    pub record_id: Uuid,
    pub version: Version,
    /// The row after the change: `Target` merged over the registered post image(s). On Update
    /// this may be partial (only changed columns) when no post image is registered. Empty on
    /// Delete.
    pub attributes: Attributes,
    /// The pre image's attributes, if one was registered (Delete carries the row's last state
    /// here).
    pub pre_image: Attributes,
    /// True when Dynamics dropped InputParameters and images (`x-ms-dynamics-msg-size-exceeded`
    /// or the members are missing): the row must be read through the Web API.
    pub data_missing: bool,
    pub correlation_id: Option<String>,
    pub operation_id: Option<String>,
    pub request_id: Option<String>,
    pub depth: i32,
}
