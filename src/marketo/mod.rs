//! marketo
