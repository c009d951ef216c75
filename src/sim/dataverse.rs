//! Dataverse Web API simulator.
