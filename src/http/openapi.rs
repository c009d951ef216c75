//! The OpenAPI 3.1 document, generated from the code (routes declare their own documentation);
//! `openapi/openapi.yaml` is this document, committed, and a test keeps them equal.

use utoipa::Modify;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "oppsync",
        description = "Keeps Adobe Marketo Engage in step with Microsoft Dynamics 365 opportunities, one way (Dynamics → Marketo).",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    tags(
        (name = "webhook", description = "Dynamics 365 service endpoint"),
        (name = "health", description = "Probes and metrics"),
        (name = "admin", description = "Operations, with a JWT bearer token"),
        (name = "refusal", description = "Marketo-side creation is refused")
    ),
    modifiers(&SecuritySchemes)
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "webhook_key",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "code",
                "Dynamics WebhookKey authentication (webhook.auth = webhook_key)",
            ))),
        );
        components.add_security_scheme(
            "webhook_header",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "x-oppsync-key",
                "Dynamics HttpHeader authentication (webhook.auth = http_header; the header name is configured)",
            ))),
        );
        components.add_security_scheme(
            "webhook_query",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "key",
                "Dynamics HttpQueryString authentication (webhook.auth = query_string; the parameter name is configured)",
            ))),
        );
        components.add_security_scheme(
            "admin_jwt",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "HS256, RS256 or ES256; scopes oppsync.read / oppsync.write in `scope` or `scp`",
                    ))
                    .build(),
            ),
        );
    }
}

pub fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The complete document: the base plus every route's documentation.
pub fn document() -> utoipa::openapi::OpenApi {
    super::api_router().split_for_parts().1
}

/// The document as YAML, as committed in `openapi/openapi.yaml`.
pub fn yaml() -> Result<String, serde_yaml_ng::Error> {
    serde_yaml_ng::to_string(&document())
}
