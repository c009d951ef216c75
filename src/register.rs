//! `oppsync register`: creates or updates the Dynamics service endpoint, steps and images.
