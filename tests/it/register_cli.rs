//! `oppsync register` and `oppsync check-config --online`: the real binary, configured only by
//! `OPPSYNC__…` environment variables, against the simulators.

use std::process::Output;
use std::time::Duration;

use oppsync::sim::env::Simulators;
use oppsync::sim::marketo::MarketoSimConfig;

use crate::support::app::KEY;
use crate::support::process::serve_env;

const HOOK: &str = "https://oppsync.example.com/webhooks/dynamics";

/// Runs `oppsync ARGS` with exactly `env` as its oppsync configuration (nothing inherited).
async fn oppsync(args: &[&str], env: &[(String, String)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_oppsync"));
    cmd.args(args)
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    for (name, _) in std::env::vars() {
        if name.starts_with("OPPSYNC") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("oppsync did not finish within 60 s")
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Fails if any of `secrets` shows in the output.
fn assert_no_secret(out: &Output, secrets: &[&str]) {
    let (stdout, stderr) = text(out);
    for s in secrets {
        assert!(!stdout.contains(s), "secret in stdout:\n{stdout}");
        assert!(!stderr.contains(s), "secret in stderr:\n{stderr}");
    }
}

async fn sims(marketo: MarketoSimConfig) -> (Simulators, Vec<(String, String)>) {
    let sims = Simulators::start(marketo).await.unwrap();
    let env = serve_env(&sims, "sqlite://oppsync.db", 8080);
    (sims, env)
}

fn secrets_of(sims: &Simulators) -> [String; 3] {
    [
        KEY.to_owned(),
        sims.marketo.client_secret(),
        sims.dataverse.client_secret().expose().to_owned(),
    ]
}

#[tokio::test]
async fn register_dry_run_writes_nothing_then_creates_then_changes_nothing() {
    let (sims, env) = sims(MarketoSimConfig::default()).await;
    let secrets = secrets_of(&sims);
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let dv = &sims.dataverse;

    let dry = oppsync(&["register", "--webhook-url", HOOK, "--dry-run"], &env).await;
    let (stdout, stderr) = text(&dry);
    assert!(dry.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("service endpoint oppsync"), "{stdout}");
    assert!(stdout.contains("would create"), "{stdout}");
    assert!(
        stdout.contains("22 of 26 objects would change (dry run)"),
        "{stdout}"
    );
    // The dry run shows the steps of closes, deleted contacts and renamed accounts too.
    for step in [
        "step opportunity Win",
        "step opportunity Lose",
        "step contact Delete",
        "step account Update",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{step} ")))
            .unwrap_or("");
        assert!(line.contains("would create"), "{step}: {stdout}");
    }
    assert_eq!(dv.write_count(), 0);
    assert!(dv.rows("serviceendpoints").is_empty());
    assert_no_secret(&dry, &secrets);

    let real = oppsync(&["register", "--webhook-url", HOOK], &env).await;
    let (stdout, stderr) = text(&real);
    assert!(real.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("22 of 26 objects changed"), "{stdout}");
    assert!(stdout.contains("step opportunity Update"), "{stdout}");
    assert!(stdout.contains("step opportunity Win"), "{stdout}");
    assert!(stdout.contains("step opportunity Lose"), "{stdout}");
    // Each object is printed once: in the table, not again in the log.
    for object in [
        "service endpoint oppsync",
        "step opportunity Win",
        "step contact Delete",
    ] {
        let times = stdout.matches(object).count() + stderr.matches(object).count();
        assert_eq!(times, 1, "{object} printed {times} times:\n{stdout}\n{stderr}");
    }
    assert_no_secret(&real, &secrets);
    let endpoints = dv.rows("serviceendpoints");
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["url"], HOOK);
    assert_eq!(endpoints[0]["name"], "oppsync");
    let ep_id = uuid::Uuid::parse_str(endpoints[0]["serviceendpointid"].as_str().unwrap()).unwrap();
    assert_eq!(dv.authvalue(ep_id).as_deref(), Some(KEY));
    assert_eq!(dv.rows("sdkmessageprocessingsteps").len(), 12);
    assert_eq!(dv.rows("sdkmessageprocessingstepimages").len(), 9);
    // The configured mapping reaches the Update step's filtering attributes.
    let opp_update = dv
        .rows("sdkmessageprocessingsteps")
        .into_iter()
        .find(|s| s["name"] == "oppsync: opportunity Update")
        .unwrap();
    let filtering = opp_update["filteringattributes"].as_str().unwrap();
    for attr in ["estimatedvalue", "closeprobability", "customerid", "statecode"] {
        assert!(filtering.contains(attr), "{filtering}");
    }

    let writes = dv.write_count();
    let again = oppsync(&["register", "--webhook-url", HOOK], &env).await;
    let (stdout, stderr) = text(&again);
    assert!(again.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("0 of 26 objects changed"), "{stdout}");
    assert!(!stdout.contains("created"), "{stdout}");
    assert_eq!(dv.write_count(), writes);
    assert_no_secret(&again, &secrets);
}

#[tokio::test]
async fn register_with_another_endpoint_name_and_a_rotated_key() {
    let (sims, mut env) = sims(MarketoSimConfig::default()).await;
    let dv = &sims.dataverse;
    let args = [
        "register",
        "--webhook-url",
        HOOK,
        "--endpoint-name",
        "oppsync-test",
    ];
    let out = oppsync(&args, &env).await;
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(dv.rows("serviceendpoints")[0]["name"], "oppsync-test");

    // Rotation: the new key first, the old one still accepted by the service.
    let rotated = "rotated-webhook-key-0002";
    env.retain(|(k, _)| k != "OPPSYNC__WEBHOOK__KEYS");
    env.push(("OPPSYNC__WEBHOOK__KEYS".into(), format!("{rotated},{KEY}")));
    let out = oppsync(&args, &env).await;
    let (stdout, _) = text(&out);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(stdout.contains("1 of 26 objects changed"), "{stdout}");
    assert!(stdout.contains("key"), "{stdout}");
    assert_no_secret(&out, &[rotated, KEY]);
    let ep = &dv.rows("serviceendpoints")[0];
    let ep_id = uuid::Uuid::parse_str(ep["serviceendpointid"].as_str().unwrap()).unwrap();
    assert_eq!(dv.authvalue(ep_id).as_deref(), Some(rotated));
}

#[tokio::test]
async fn register_explains_what_is_missing() {
    let out = oppsync(&["register", "--webhook-url", HOOK], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    let (_, stderr) = text(&out);
    for needle in [
        "cannot register",
        "OPPSYNC__DATAVERSE__URL",
        "OPPSYNC__DATAVERSE__CLIENT_SECRET",
        "OPPSYNC__WEBHOOK__KEYS",
    ] {
        assert!(stderr.contains(needle), "{needle} missing from:\n{stderr}");
    }

    let out = oppsync(&["register", "--webhook-url", "ftp://example.com/x"], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(text(&out).1.contains("scheme"), "{:?}", text(&out));
}

#[tokio::test]
async fn register_fails_clearly_when_dataverse_refuses() {
    let (sims, env) = sims(MarketoSimConfig::default()).await;
    sims.dataverse.set_not_member(true);
    let out = oppsync(&["register", "--webhook-url", HOOK], &env).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("registration with"), "{stderr}");
    assert!(stderr.contains("Dataverse"), "{stderr}");
    assert_eq!(sims.dataverse.write_count(), 0);
    assert_no_secret(&out, &[KEY]);
}

#[tokio::test]
async fn check_config_online_passes_against_healthy_simulators() {
    let (sims, env) = sims(MarketoSimConfig::default()).await;
    let secrets = secrets_of(&sims);
    let out = oppsync(&["check-config", "--online"], &env).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("marketo: ok"), "{stdout}");
    assert!(stdout.contains("native CRM sync is off"), "{stdout}");
    assert!(stdout.contains("dataverse: ok"), "{stdout}");
    assert!(stdout.contains("Stakeholder"), "{stdout}");
    assert!(stderr.contains("online checks passed"), "{stderr}");
    assert_no_secret(&out, &secrets.iter().map(String::as_str).collect::<Vec<_>>());
    // The probe changes nothing in Marketo.
    assert!(sims.marketo.opportunities().is_empty());
}

#[tokio::test]
async fn check_config_online_reports_native_crm_sync() {
    let (sims, env) = sims(MarketoSimConfig::default()).await;
    sims.marketo.set_crm_enabled(true);
    let out = oppsync(&["check-config", "--online"], &env).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("marketo: FAILED"), "{stdout}");
    assert!(stdout.contains("1018"), "{stdout}");
    assert!(stdout.contains("native CRM sync is enabled"), "{stdout}");
    assert!(stdout.contains("dataverse: ok"), "{stdout}");
    assert!(stderr.contains("online checks failed"), "{stderr}");

    // Response-level placement of 1018 reads the same.
    let (sims, env) = sims_with_response_level_1018().await;
    let out = oppsync(&["check-config", "--online"], &env).await;
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("native CRM sync"), "{stdout}");
    drop(sims);
}

async fn sims_with_response_level_1018() -> (Simulators, Vec<(String, String)>) {
    sims(MarketoSimConfig {
        crm_enabled: true,
        crm_response_level: true,
        ..MarketoSimConfig::default()
    })
    .await
}

#[tokio::test]
async fn check_config_online_reports_refused_credentials() {
    let (sims, mut env) = sims(MarketoSimConfig::default()).await;
    sims.dataverse.set_not_member(true);
    env.retain(|(k, _)| k != "OPPSYNC__MARKETO__CLIENT_SECRET");
    env.push((
        "OPPSYNC__MARKETO__CLIENT_SECRET".into(),
        "wrong-marketo-secret".into(),
    ));
    let out = oppsync(&["check-config", "--online"], &env).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("marketo: FAILED"), "{stdout}");
    assert!(stdout.contains("dataverse: FAILED"), "{stdout}");
    assert_no_secret(&out, &["wrong-marketo-secret", KEY]);
}

#[tokio::test]
async fn check_config_without_online_touches_nothing() {
    let (sims, env) = sims(MarketoSimConfig::default()).await;
    let out = oppsync(&["check-config"], &env).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("[marketo]"), "{stdout}");
    assert!(!stdout.contains("marketo: ok"), "{stdout}");
    assert_eq!(sims.marketo.rest_call_count(), 0);
    assert_eq!(sims.dataverse.token_issued_count(), 0);
}

/// Without --online, check-config validates a partial file for what it holds and lists what
/// `serve` would still need, without failing; a bad value still fails it, every one listed.
#[tokio::test]
async fn check_config_validates_a_partial_file_and_lists_what_serve_still_needs() {
    let partial = [("OPPSYNC__MARKETO__BATCH_SIZE".to_owned(), "200".to_owned())];
    let out = oppsync(&["check-config"], &partial).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("batch_size = 200"), "{stdout}");
    assert!(stderr.contains("`serve` also needs"), "{stderr}");
    for needed in ["webhook.keys", "marketo.base_url", "dataverse.url"] {
        assert!(stderr.contains(needed), "{needed}: {stderr}");
    }
    let bad = [
        ("OPPSYNC__MARKETO__BATCH_SIZE".to_owned(), "900".to_owned()),
        (
            "OPPSYNC__MARKETO__BASE_URL".to_owned(),
            "ftp://example.com".to_owned(),
        ),
    ];
    let out = oppsync(&["check-config"], &bad).await;
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("marketo.batch_size") && stderr.contains("marketo.base_url"),
        "{stderr}"
    );
    // Online, the collaborators are called: what serve needs is required.
    let out = oppsync(&["check-config", "--online"], &partial).await;
    assert!(!out.status.success());
}

/// `oppsync token` mints within admin.max_token_ttl_secs and refuses longer lifetimes, which the
/// service would refuse anyway.
#[tokio::test]
async fn token_refuses_a_lifetime_beyond_the_configured_maximum() {
    let env = [(
        "OPPSYNC__ADMIN__JWT_SECRET".to_owned(),
        "a-token-secret-of-at-least-32-characters".to_owned(),
    )];
    let long = oppsync(&["token", "--scope", "oppsync.read", "--ttl", "36500d"], &env).await;
    let (stdout, stderr) = text(&long);
    assert!(!long.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("max_token_ttl_secs"), "{stderr}");
    assert!(stdout.trim().is_empty(), "no token printed: {stdout}");
    let short = oppsync(&["token", "--scope", "oppsync.read", "--ttl", "1h"], &env).await;
    let (stdout, stderr) = text(&short);
    assert!(short.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.trim().split('.').count(), 3, "{stdout}");
}

/// Where a table has change tracking off, register and check-config --online say so, and
/// `register --enable-change-tracking` turns it on (a dry run only says it would).
#[tokio::test]
async fn register_reports_change_tracking_and_turns_it_on_when_asked() {
    let (sims, env) = sims(MarketoSimConfig::default()).await;
    let dv = &sims.dataverse;
    dv.set_change_tracking("opportunities", false);
    dv.set_change_tracking("accounts", false);

    let check = oppsync(&["check-config", "--online"], &env).await;
    let (stdout, stderr) = text(&check);
    assert!(check.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("change tracking OFF for opportunity, account"),
        "{stdout}"
    );

    let plain = oppsync(&["register", "--webhook-url", HOOK], &env).await;
    let (stdout, stderr) = text(&plain);
    assert!(plain.status.success(), "{stdout}\n{stderr}");
    let line = |out: &str, table: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("change tracking {table} ")))
            .unwrap_or("")
            .to_owned()
    };
    assert!(line(&stdout, "opportunity").contains(" off "), "{stdout}");
    assert!(
        line(&stdout, "opportunity").contains("--enable-change-tracking"),
        "{stdout}"
    );
    assert!(line(&stdout, "contact").contains("unchanged"), "{stdout}");
    assert!(!dv.change_tracking("opportunities"));

    let dry = oppsync(
        &[
            "register",
            "--webhook-url",
            HOOK,
            "--enable-change-tracking",
            "--dry-run",
        ],
        &env,
    )
    .await;
    let (stdout, _) = text(&dry);
    assert!(line(&stdout, "account").contains("would update"), "{stdout}");
    assert!(!dv.change_tracking("accounts"));

    let on = oppsync(
        &["register", "--webhook-url", HOOK, "--enable-change-tracking"],
        &env,
    )
    .await;
    let (stdout, stderr) = text(&on);
    assert!(on.status.success(), "{stdout}\n{stderr}");
    assert!(line(&stdout, "opportunity").contains("updated"), "{stdout}");
    assert!(line(&stdout, "account").contains("updated"), "{stdout}");
    assert!(dv.change_tracking("opportunities") && dv.change_tracking("accounts"));
    // Written back whole, labels merged, then published.
    let calls = dv.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.method == "PUT" && c.path.contains("EntityDefinitions(LogicalName='opportunity')")),
        "no definition PUT"
    );
    assert!(
        calls
            .iter()
            .any(|c| c.method == "POST" && c.path.ends_with("/PublishXml"))
    );

    let check = oppsync(&["check-config", "--online"], &env).await;
    let (stdout, _) = text(&check);
    assert!(stdout.contains("change tracking on for every table"), "{stdout}");
}
