//! Everything Dynamics 365 / Dataverse: the webhook wire format (a DCJS-serialised
//! `RemoteExecutionContext`), the domain events it becomes, and the Dataverse Web API client.

pub mod compose;
pub mod event;
pub mod organization;
pub mod value;
pub mod webapi;
pub mod wire;

pub use event::{DynamicsEvent, EntityKind, MessageKind, Version};
pub use value::{AttributeValue, Attributes, Entity, EntityRef};
pub use wire::{DecodeError, Notification, decode_notification};
