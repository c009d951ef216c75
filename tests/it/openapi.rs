//! The OpenAPI document against the code: the committed YAML is the generated one, and the
//! document lists exactly the routes the real router serves.

use std::collections::BTreeSet;

use crate::support::jwt;

/// Every (method, path) the service serves. Kept by hand on purpose: it is checked both against
/// the running router (each answers, neither 404 nor 405) and against the document.
const ROUTES: &[(&str, &str)] = &[
    ("POST", "/webhooks/dynamics"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/marketo/opportunities"),
    ("POST", "/marketo/opportunities"),
    ("PUT", "/marketo/opportunities"),
    ("PATCH", "/marketo/opportunities"),
    ("DELETE", "/marketo/opportunities"),
    ("POST", "/admin/opportunities"),
    ("GET", "/admin/opportunities/{id}"),
    ("POST", "/admin/opportunities/{id}/resync"),
    ("GET", "/admin/notifications"),
    ("GET", "/admin/notifications/{id}"),
    ("POST", "/admin/notifications/{id}/retry"),
    ("POST", "/admin/notifications/{id}/discard"),
    ("POST", "/admin/notifications/retry-dead"),
    ("GET", "/admin/writes"),
    ("POST", "/admin/writes/{key}/retry"),
    ("POST", "/admin/writes/{key}/discard"),
    ("POST", "/admin/writes/retry-dead"),
    ("POST", "/admin/pause"),
    ("POST", "/admin/resume"),
    ("GET", "/admin/stats"),
    ("POST", "/admin/backfill"),
    ("GET", "/admin/backfill"),
    ("DELETE", "/admin/backfill"),
    ("GET", "/admin/reconcile"),
    ("POST", "/admin/reconcile"),
    ("GET", "/admin/drift"),
    ("POST", "/admin/drift/repair"),
];

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

fn concrete(path: &str) -> String {
    path.replace("{id}", "00000000-0000-4000-8000-000000000001")
        .replace("{key}", "opportunity:x")
}

fn documented() -> BTreeSet<(String, String)> {
    let doc = serde_json::to_value(oppsync::http::openapi::document()).unwrap();
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if METHODS.contains(&method.to_uppercase().as_str()) {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn openapi_document_lists_exactly_the_routes() {
    let routes: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(routes.len(), ROUTES.len(), "ROUTES has duplicates");
    let doc = documented();
    let missing: Vec<_> = routes.difference(&doc).collect();
    let extra: Vec<_> = doc.difference(&routes).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "routes missing from the OpenAPI document: {missing:?}; documented but not in ROUTES: {extra:?}"
    );
}

/// Each listed route is served (not 404/405), and on the same paths every other method is 405:
/// the router has no route the list (hence the document) lacks on those paths. Paths outside
/// the list fall through to the 404 fallback, also checked.
#[tokio::test]
async fn openapi_routes_are_served_by_the_router() {
    let env = jwt::env_with_secret(true).await;
    let token = jwt::read_token();
    let paths: BTreeSet<&str> = ROUTES.iter().map(|(_, p)| *p).collect();
    for path in &paths {
        for method in METHODS {
            let listed = ROUTES.contains(&(*method, *path));
            let url = format!("{}{}", env.app.url(), concrete(path));
            let r = env
                .http
                .request(method.parse().unwrap(), url)
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            // A handler may answer 404 for an unknown record; the router's own 404 is the
            // fallback's "There is no route" problem.
            let body = r.text().await.unwrap();
            let unrouted = status == 405 || (status == 404 && body.contains("There is no route"));
            if listed {
                assert!(!unrouted, "{method} {path}: {status}, not served");
            } else {
                assert_eq!(status, 405, "{method} {path}: served but not listed");
            }
        }
    }
    let r = env
        .http
        .get(format!("{}/admin/nothing-here", env.app.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(r.text().await.unwrap().contains("There is no route"));
    // /openapi.json serves the document itself.
    let (status, served) = env.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(
        served,
        serde_json::to_value(oppsync::http::openapi::document()).unwrap()
    );
    env.stop().await;
}

#[test]
fn openapi_committed_yaml_is_the_generated_one() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.yaml");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = oppsync::http::openapi::yaml().unwrap();
    assert!(
        committed == generated,
        "openapi/openapi.yaml is out of date: run `cargo run -- openapi > openapi/openapi.yaml` and commit it"
    );
}
