//! Typed attribute values, as Dynamics sends them in a RemoteExecutionContext and as the
//! Dataverse Web API returns them after conversion. This is the vocabulary shared by the wire
//! parser, the Web API client and the rules.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// Attributes of one row, by logical name. Ordered so that stored state serialises stably.
pub type Attributes = BTreeMap<String, AttributeValue>;

/// One attribute value. `Null` is an explicit null (the column was cleared), which differs from
/// the attribute being absent (not sent, unchanged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum AttributeValue {
    Null,
    /// Plain strings, including Guids that are not lookups (Dynamics sends them unmarked).
    String(String),
    Bool(bool),
    Int(i64),
    /// Decimal or float column, kept exact.
    Decimal(Decimal),
    /// Money column (`{"__type":"Money:…","Value":…}`), kept exact.
    Money(Decimal),
    /// Picklist, state or status (`OptionSetValue`).
    OptionSet(i32),
    /// Multi-select picklist: a bare array of `OptionSetValue`s.
    OptionSetCollection(Vec<i32>),
    /// A DCJS `/Date(ms±hhmm)/` (the offset is informational only) or an ISO 8601 string.
    DateTime(#[serde(with = "time::serde::rfc3339")] OffsetDateTime),
    /// Lookup, customer or owner.
    EntityReference(EntityRef),
    /// `EntityCollection` (activity parties and the like).
    EntityCollection(Vec<Entity>),
    /// Anything else, kept verbatim so nothing is silently lost.
    Other(serde_json::Value),
}

/// A reference to a row of some table (`EntityReference`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntityRef {
    pub logical_name: String,
    pub id: Uuid,
    /// Display name; Dynamics usually sends null here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A row (`Entity`): the target of a Create/Update, or an image.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Entity {
    pub logical_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    #[serde(default)]
    pub attributes: Attributes,
    /// Display strings by attribute (`FormattedValues`), e.g. option-set labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub formatted_values: BTreeMap<String, String>,
}

impl AttributeValue {
    /// The referenced row, when this is a lookup.
    pub fn as_entity_ref(&self) -> Option<&EntityRef> {
        match self {
            AttributeValue::EntityReference(r) => Some(r),
            _ => None,
        }
    }

    /// The option value, when this is a picklist (or an integer standing for one, as the
    /// Web API returns them).
    pub fn as_option_value(&self) -> Option<i32> {
        match self {
            AttributeValue::OptionSet(v) => Some(*v),
            AttributeValue::Int(v) => i32::try_from(*v).ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            AttributeValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            AttributeValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, AttributeValue::Null)
    }
}
