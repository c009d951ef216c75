//! The association rules and field mapping: pure functions from Dynamics events and what oppsync
//! already knows to the state to store and the Marketo writes to make. No I/O, no async.
//!
//! The flow for one event: [`apply`] merges it into a [`World`] (the slice of known state the
//! worker loaded), [`project`] says what Marketo should hold for each opportunity it touched, and
//! [`plan`] turns the last planned projection into the new one as [`MarketoWrite`]s.

pub mod config;
pub mod mapping;
pub mod plan;
pub mod project;
pub mod state;

#[cfg(test)]
mod tests;

pub use config::{Conversion, DerivedFields, FieldMapping, LeadMatch, MissingLead, SyncConfig};
pub use plan::{BadWriteKey, MarketoWrite, Phase, WriteKey, plan};
pub use project::{
    CompanyRecord, Lookup, Projection, RejectedValue, RoleKey, RoleSource, project, role_sources,
};
pub use state::{
    ACCOUNT_ATTRIBUTES, AccountState, Applied, CONNECTION_ATTRIBUTES, CONTACT_ATTRIBUTES, ConnectionRoleInfo,
    ConnectionState, ContactState, LOOKUP_ATTRIBUTES, NeedsRow, OpportunityState, Versioned,
    VersionedAttributes, World, apply, connection_opportunity, customer_contact, event_opportunity,
    full_row_event,
};
