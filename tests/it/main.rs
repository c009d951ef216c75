//! Integration tests: one binary (faster to build than one per file), modules by area.

mod support;

mod store_pg;
