//! Which Dataverse organisation oppsync serves. A sandbox copied from production keeps the
//! service endpoint and its key (specs/dynamics.md, addendum), so the key alone does not tell
//! production's notifications from the copy's: the body's `OrganizationId` and the
//! `x-ms-dynamics-organization` header do. Checking them costs no call: the id is configured or
//! learnt once at start through `WhoAmI`.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::webapi::DataverseClient;
use crate::config::DataverseConfig;

/// How long start waits for the first `WhoAmI` answer.
const FIRST_ATTEMPT: Duration = Duration::from_secs(5);

/// A notification from another organisation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForeignOrganization {
    #[error("the notification comes from organisation {theirs}, oppsync serves {ours}")]
    Id { ours: Uuid, theirs: String },
    #[error("the notification comes from host {theirs}, oppsync serves {ours}")]
    Host { ours: String, theirs: String },
}

/// The organisation oppsync serves: its id (configured, or learnt) and host name.
#[derive(Debug, Default)]
pub struct Organization {
    id: RwLock<Option<Uuid>>,
    host: Option<String>,
}

impl Organization {
    pub fn new(config: &DataverseConfig) -> Self {
        Organization {
            id: RwLock::new(config.organization_id),
            host: config.expected_organization_host(),
        }
    }

    pub fn id(&self) -> Option<Uuid> {
        *self.id.read()
    }

    pub fn set_id(&self, id: Uuid) {
        *self.id.write() = Some(id);
    }

    /// Checks a notification's `OrganizationId` (body) and `x-ms-dynamics-organization`
    /// (header). What is absent on either side is not checked: older bodies may lack the id,
    /// and until `WhoAmI` has answered the id is unknown.
    pub fn check(&self, body_id: Option<&str>, header_host: Option<&str>) -> Result<(), ForeignOrganization> {
        if let (Some(ours), Some(theirs)) = (self.id(), body_id)
            && Uuid::parse_str(theirs.trim()).ok() != Some(ours)
        {
            return Err(ForeignOrganization::Id {
                ours,
                theirs: capped(theirs),
            });
        }
        if let (Some(ours), Some(theirs)) = (&self.host, header_host) {
            let normalised = theirs.trim().trim_end_matches('.').to_ascii_lowercase();
            if !normalised.is_empty() && normalised != *ours {
                return Err(ForeignOrganization::Host {
                    ours: ours.clone(),
                    theirs: capped(theirs),
                });
            }
        }
        Ok(())
    }
}

/// What the sender wrote, shortened: it goes into logs and answers.
fn capped(text: &str) -> String {
    text.chars().take(100).collect()
}

/// Learns the organisation id through `WhoAmI` when it is not configured, and logs it. Tries
/// once before returning; if Dataverse cannot answer now, keeps trying in the background (with
/// growing pauses, until `stop`), so a Dataverse outage does not stop intake from starting.
pub async fn learn(organization: Arc<Organization>, client: DataverseClient, stop: CancellationToken) {
    // The first attempt is bounded so a Dataverse that does not answer delays start only briefly.
    if let Ok(true) = tokio::time::timeout(FIRST_ATTEMPT, try_learn(&organization, &client)).await {
        return;
    }
    tokio::spawn(async move {
        let mut pause = Duration::from_secs(1);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            if try_learn(&organization, &client).await {
                return;
            }
            pause = (pause * 2).min(Duration::from_secs(60));
        }
    });
}

async fn try_learn(organization: &Organization, client: &DataverseClient) -> bool {
    match client.who_am_i().await {
        Ok(me) => {
            organization.set_id(me.organization_id);
            tracing::info!(
                organization_id = %me.organization_id,
                "learnt the Dataverse organisation from WhoAmI; notifications from any other are refused"
            );
            true
        }
        Err(error) => {
            tracing::warn!(
                %error,
                "could not learn the Dataverse organisation from WhoAmI yet; notifications are not checked against it until then (set dataverse.organization_id to avoid this)"
            );
            false
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const OURS: Uuid = Uuid::from_u128(0x4ef5b371_e89e_e711_8122_000d3aa2331c);

    fn organization() -> Organization {
        let config = DataverseConfig {
            url: url::Url::parse("https://Contoso.crm.dynamics.com/").ok(),
            organization_id: Some(OURS),
            ..DataverseConfig::default()
        };
        Organization::new(&config)
    }

    #[test]
    fn our_own_notifications_pass() {
        let org = organization();
        assert_eq!(
            org.check(Some(&OURS.to_string()), Some("contoso.crm.dynamics.com")),
            Ok(())
        );
        assert_eq!(
            org.check(
                Some(&OURS.to_string().to_uppercase()),
                Some("CONTOSO.crm.dynamics.com.")
            ),
            Ok(())
        );
        assert_eq!(org.check(None, None), Ok(()));
    }

    #[test]
    fn another_id_or_host_is_foreign() {
        let org = organization();
        let sandbox = Uuid::from_u128(7).to_string();
        assert_eq!(
            org.check(Some(&sandbox), None),
            Err(ForeignOrganization::Id {
                ours: OURS,
                theirs: sandbox
            })
        );
        assert!(matches!(
            org.check(Some("not a guid"), None),
            Err(ForeignOrganization::Id { .. })
        ));
        assert_eq!(
            org.check(None, Some("contoso-sandbox.crm.dynamics.com")),
            Err(ForeignOrganization::Host {
                ours: "contoso.crm.dynamics.com".into(),
                theirs: "contoso-sandbox.crm.dynamics.com".into()
            })
        );
    }

    #[test]
    fn an_unknown_id_checks_only_the_host() {
        let org = Organization::new(&DataverseConfig::default());
        assert_eq!(
            org.check(Some(&Uuid::from_u128(7).to_string()), Some("anything")),
            Ok(())
        );
        org.set_id(OURS);
        assert!(org.check(Some(&Uuid::from_u128(7).to_string()), None).is_err());
    }
}
