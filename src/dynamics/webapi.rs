//! Dataverse Web API client (OAuth2 client credentials, contact/opportunity/connection-role reads).
