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
    /// Only its name is read: the name of the Marketo company (`externalCompanyId` = accountid).
    Account,
}

impl EntityKind {
    pub fn logical_name(self) -> &'static str {
        match self {
            EntityKind::Opportunity => "opportunity",
            EntityKind::Connection => "connection",
            EntityKind::Contact => "contact",
            EntityKind::Account => "account",
        }
    }

    pub fn from_logical_name(name: &str) -> Option<Self> {
        match name {
            "opportunity" => Some(EntityKind::Opportunity),
            "connection" => Some(EntityKind::Connection),
            "contact" => Some(EntityKind::Contact),
            "account" => Some(EntityKind::Account),
            _ => None,
        }
    }
}

/// The messages oppsync handles. Closing an opportunity comes as `Win` / `Lose`; older
/// organisations also send `SetState` / `SetStateDynamicEntity` (current Dataverse routes
/// SetState and Assign through Update). Every message but Create and Delete is a change of some
/// columns of an existing row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    Create,
    Update,
    Delete,
    Win,
    Lose,
    SetState,
    SetStateDynamicEntity,
}

impl MessageKind {
    pub fn name(self) -> &'static str {
        match self {
            MessageKind::Create => "Create",
            MessageKind::Update => "Update",
            MessageKind::Delete => "Delete",
            MessageKind::Win => "Win",
            MessageKind::Lose => "Lose",
            MessageKind::SetState => "SetState",
            MessageKind::SetStateDynamicEntity => "SetStateDynamicEntity",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "Create" => Some(MessageKind::Create),
            "Update" => Some(MessageKind::Update),
            "Delete" => Some(MessageKind::Delete),
            "Win" => Some(MessageKind::Win),
            "Lose" => Some(MessageKind::Lose),
            "SetState" => Some(MessageKind::SetState),
            "SetStateDynamicEntity" => Some(MessageKind::SetStateDynamicEntity),
            _ => None,
        }
    }

    /// Win, Lose and the SetState messages change the state of a row, from their message
    /// parameters rather than from a Target entity.
    pub fn is_state_change(self) -> bool {
        matches!(
            self,
            MessageKind::Win | MessageKind::Lose | MessageKind::SetState | MessageKind::SetStateDynamicEntity
        )
    }
}

/// (entity, message) pairs oppsync accepts; anything else is answered 422.
pub const HANDLED: &[(EntityKind, MessageKind)] = &[
    (EntityKind::Opportunity, MessageKind::Create),
    (EntityKind::Opportunity, MessageKind::Update),
    (EntityKind::Opportunity, MessageKind::Delete),
    (EntityKind::Opportunity, MessageKind::Win),
    (EntityKind::Opportunity, MessageKind::Lose),
    (EntityKind::Opportunity, MessageKind::SetState),
    (EntityKind::Opportunity, MessageKind::SetStateDynamicEntity),
    (EntityKind::Connection, MessageKind::Create),
    (EntityKind::Connection, MessageKind::Update),
    (EntityKind::Connection, MessageKind::Delete),
    (EntityKind::Contact, MessageKind::Create),
    (EntityKind::Contact, MessageKind::Update),
    (EntityKind::Contact, MessageKind::Delete),
    (EntityKind::Account, MessageKind::Update),
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
