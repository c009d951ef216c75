//! Sync is one way, Dynamics → Marketo (DESIGN §2). A Marketo webhook or any tool that tries to
//! create an opportunity through oppsync gets a clear 403, whatever the method.

use super::problem::{ApiError, Problem};

macro_rules! refusal {
    ($name:ident, $method:ident) => {
        /// Refused: opportunities are created in Dynamics 365 and synced one way to Marketo.
        #[utoipa::path(
            $method,
            path = "/marketo/opportunities",
            tag = "refusal",
            responses((status = 403, description = "Always: opportunities are created in Dynamics 365 and synced one way to Marketo", body = Problem, content_type = "application/problem+json"))
        )]
        pub async fn $name() -> ApiError {
            ApiError::MarketoSideCreation
        }
    };
}

refusal!(refuse_get, get);
refusal!(refuse_post, post);
refusal!(refuse_put, put);
refusal!(refuse_patch, patch);
refusal!(refuse_delete, delete);
