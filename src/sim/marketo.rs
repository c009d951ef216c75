//! Marketo simulator.
