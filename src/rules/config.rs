//! `[sync]` configuration: which fields are synced and how, role names, lead matching
//! (DESIGN.md §6).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Marketo opportunity fields oppsync always writes itself (DESIGN.md §2): mapping another
/// Dynamics attribute onto them would fight the keys.
pub const EXTERNAL_OPPORTUNITY_ID: &str = "externalOpportunityId";
pub const EXTERNAL_COMPANY_ID: &str = "externalCompanyId";

/// Marketo's opportunity role is a 50-character string (specs/marketo.md §4).
const MARKETO_ROLE_MAX_LEN: usize = 50;

/// The `[sync]` section. A `fields` list in the file replaces the default mapping as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    /// Dynamics opportunity attribute → Marketo opportunity field.
    pub fields: Vec<FieldMapping>,
    pub derived: DerivedFields,
    /// Role name of the opportunity role made for a potential customer that is a contact.
    pub customer_role: String,
    /// `connectionrole.category` values that make a connection a stakeholder
    /// (specs/dynamics.md §6.3: 1000 Stakeholder).
    pub stakeholder_categories: Vec<i32>,
    pub lead_match: LeadMatch,
    /// Marketo lead field holding the Dynamics contact id; required when `lead_match = "field"`.
    pub lead_match_field: Option<String>,
    pub missing_lead: MissingLead,
}

impl Default for SyncConfig {
    /// Mirrors Marketo's native Dynamics sync (specs/dynamics.md §8).
    fn default() -> Self {
        let stage_labels = [("0", "Open"), ("1", "Won"), ("2", "Lost")]
            .into_iter()
            .map(|(v, l)| (v.to_owned(), l.to_owned()))
            .collect();
        SyncConfig {
            fields: vec![
                FieldMapping::new("name", "name", Conversion::String),
                FieldMapping::new("description", "description", Conversion::String),
                FieldMapping::new("closeprobability", "probability", Conversion::Int),
                FieldMapping::new("estimatedvalue", "amount", Conversion::Money),
                FieldMapping::new("estimatedclosedate", "closeDate", Conversion::Date),
                FieldMapping {
                    labels: stage_labels,
                    ..FieldMapping::new("statecode", "stage", Conversion::OptionsetLabel)
                },
            ],
            derived: DerivedFields::default(),
            customer_role: "Potential Customer".to_owned(),
            stakeholder_categories: vec![1000],
            lead_match: LeadMatch::Email,
            lead_match_field: None,
            missing_lead: MissingLead::Create,
        }
    }
}

/// One mapped attribute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMapping {
    /// Dynamics logical name, e.g. `estimatedvalue`.
    pub dynamics: String,
    /// Marketo field API name, e.g. `amount`.
    pub marketo: String,
    pub conversion: Conversion,
    /// Option value → label, for `optionset_label`. Keys are the option values as strings
    /// because TOML table keys are strings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl FieldMapping {
    pub fn new(dynamics: &str, marketo: &str, conversion: Conversion) -> Self {
        FieldMapping {
            dynamics: dynamics.to_owned(),
            marketo: marketo.to_owned(),
            conversion,
            labels: BTreeMap::new(),
        }
    }
}

/// How a Dynamics value becomes a Marketo value (DESIGN.md §6). Read from a plain string so
/// that an unknown name is reported by [`SyncConfig::problems`] together with the entry it is
/// in, instead of a bare serde error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Conversion {
    String,
    Int,
    Decimal,
    Money,
    Bool,
    /// `YYYY-MM-DD` (UTC date).
    Date,
    /// RFC 3339, UTC.
    Datetime,
    OptionsetLabel,
    OptionsetValue,
    LookupId,
    LookupName,
    /// A name this version does not know; always a configuration problem.
    Unknown(String),
}

impl Conversion {
    const NAMES: &[(&str, Conversion)] = &[
        ("string", Conversion::String),
        ("int", Conversion::Int),
        ("decimal", Conversion::Decimal),
        ("money", Conversion::Money),
        ("bool", Conversion::Bool),
        ("date", Conversion::Date),
        ("datetime", Conversion::Datetime),
        ("optionset_label", Conversion::OptionsetLabel),
        ("optionset_value", Conversion::OptionsetValue),
        ("lookup_id", Conversion::LookupId),
        ("lookup_name", Conversion::LookupName),
    ];

    pub fn name(&self) -> &str {
        match self {
            Conversion::Unknown(name) => name,
            known => Self::NAMES
                .iter()
                .find(|(_, c)| c == known)
                .map_or("unknown", |(n, _)| n),
        }
    }
}

impl From<String> for Conversion {
    fn from(name: String) -> Self {
        Conversion::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(Conversion::Unknown(name), |(_, c)| c.clone())
    }
}

impl From<Conversion> for String {
    fn from(c: Conversion) -> Self {
        c.name().to_owned()
    }
}

impl fmt::Display for Conversion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Marketo fields computed from `statecode` (0 Open, 1 Won, 2 Lost). An empty name turns the
/// field off (TOML has no null).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DerivedFields {
    pub is_closed: Option<String>,
    pub is_won: Option<String>,
}

impl Default for DerivedFields {
    fn default() -> Self {
        DerivedFields {
            is_closed: Some("isClosed".to_owned()),
            is_won: Some("isWon".to_owned()),
        }
    }
}

impl DerivedFields {
    /// The configured name, when the field is on.
    pub fn is_closed_field(&self) -> Option<&str> {
        self.is_closed.as_deref().filter(|n| !n.is_empty())
    }

    pub fn is_won_field(&self) -> Option<&str> {
        self.is_won.as_deref().filter(|n| !n.is_empty())
    }
}

/// How a Dynamics contact is found among Marketo leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeadMatch {
    /// By `emailaddress1` = lead `email`.
    #[default]
    Email,
    /// By a Marketo lead field holding the Dynamics contact id (`lead_match_field`).
    Field,
}

/// What to do when no Marketo lead matches a contact that needs a role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingLead {
    #[default]
    Create,
    DeadLetter,
}

impl SyncConfig {
    /// Every problem of this section, each naming the offending entry.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        // Marketo field names are case-insensitive, so clashes are too.
        let mut writers: BTreeMap<String, String> = BTreeMap::new();
        for name in [EXTERNAL_OPPORTUNITY_ID, EXTERNAL_COMPANY_ID] {
            writers.insert(name.to_ascii_lowercase(), format!("oppsync itself ({name})"));
        }
        for (name, entry) in [
            (self.derived.is_closed_field(), "sync.derived.is_closed"),
            (self.derived.is_won_field(), "sync.derived.is_won"),
        ] {
            let Some(name) = name else { continue };
            let key = name.to_ascii_lowercase();
            if let Some(other) = writers.get(&key) {
                p.push(format!(
                    "{entry} ({name}): Marketo field {name:?} is already written by {other}"
                ));
            } else {
                writers.insert(key, entry.to_owned());
            }
        }
        for (i, f) in self.fields.iter().enumerate() {
            let entry = format!("sync.fields[{i}] ({} → {})", f.dynamics, f.marketo);
            if f.dynamics.trim().is_empty() {
                p.push(format!("{entry}: `dynamics` (the Dynamics attribute) is empty"));
            }
            if f.marketo.trim().is_empty() {
                p.push(format!("{entry}: `marketo` (the Marketo field) is empty"));
            } else {
                let key = f.marketo.to_ascii_lowercase();
                if let Some(other) = writers.get(&key) {
                    p.push(format!(
                        "{entry}: Marketo field {:?} is already written by {other}",
                        f.marketo
                    ));
                } else {
                    writers.insert(key, format!("sync.fields[{i}]"));
                }
            }
            if let Conversion::Unknown(name) = &f.conversion {
                let known: Vec<&str> = Conversion::NAMES.iter().map(|(n, _)| *n).collect();
                p.push(format!(
                    "{entry}: unknown conversion {name:?}; expected one of {}",
                    known.join(", ")
                ));
            }
            if f.conversion == Conversion::OptionsetLabel && f.labels.is_empty() {
                p.push(format!(
                    "{entry}: conversion optionset_label needs `labels` (option value → label)"
                ));
            }
            if !f.labels.is_empty() && f.conversion != Conversion::OptionsetLabel {
                p.push(format!(
                    "{entry}: `labels` only apply to conversion optionset_label, not {}",
                    f.conversion
                ));
            }
            for value in f.labels.keys() {
                if value.trim().parse::<i32>().is_err() {
                    p.push(format!(
                        "{entry}: label key {value:?} is not an option value (an integer)"
                    ));
                }
            }
        }
        if self.customer_role.trim().is_empty() {
            p.push("sync.customer_role: must not be empty".to_owned());
        } else if self.customer_role.chars().count() > MARKETO_ROLE_MAX_LEN {
            p.push(format!(
                "sync.customer_role ({:?}): Marketo role names hold at most {MARKETO_ROLE_MAX_LEN} characters",
                self.customer_role
            ));
        }
        if self.lead_match == LeadMatch::Field
            && self
                .lead_match_field
                .as_deref()
                .is_none_or(|f| f.trim().is_empty())
        {
            p.push(
                "sync.lead_match_field: required when sync.lead_match = \"field\" (the Marketo lead field holding the Dynamics contact id)"
                    .to_owned(),
            );
        }
        p
    }

    /// The Dynamics attributes the opportunity steps and images must carry: the mapped ones,
    /// `customerid` and `statecode` (rules), `modifiedon` (versions) and `name` (required on
    /// every row, so its presence tells a full image from a partial Target; see
    /// [`crate::rules::OpportunityState::seen_in_full`]).
    pub fn opportunity_attributes(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .fields
            .iter()
            .map(|f| f.dynamics.clone())
            .chain(
                ["customerid", "statecode", "modifiedon", "name"]
                    .iter()
                    .map(|s| (*s).to_owned()),
            )
            .filter(|n| !n.trim().is_empty())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The label for `value` of an `optionset_label` mapping, tolerant of spaces in keys.
    pub(crate) fn label(mapping: &FieldMapping, value: i32) -> Option<&str> {
        mapping
            .labels
            .iter()
            .find(|(k, _)| k.trim().parse::<i32>() == Ok(value))
            .map(|(_, l)| l.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> SyncConfig {
        #[derive(Deserialize)]
        struct File {
            sync: SyncConfig,
        }
        match toml::from_str::<File>(toml_text) {
            Ok(f) => f.sync,
            Err(e) => panic!("does not parse: {e}"),
        }
    }

    fn problems_of(toml_text: &str) -> String {
        parse(toml_text).problems().join("\n")
    }

    #[test]
    fn defaults_mirror_marketo_native_sync_and_are_valid() {
        let c = SyncConfig::default();
        assert_eq!(c.problems(), Vec::<String>::new());
        let pairs: Vec<(&str, &str, &str)> = c
            .fields
            .iter()
            .map(|f| (f.dynamics.as_str(), f.marketo.as_str(), f.conversion.name()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("name", "name", "string"),
                ("description", "description", "string"),
                ("closeprobability", "probability", "int"),
                ("estimatedvalue", "amount", "money"),
                ("estimatedclosedate", "closeDate", "date"),
                ("statecode", "stage", "optionset_label"),
            ]
        );
        assert_eq!(c.derived.is_closed_field(), Some("isClosed"));
        assert_eq!(c.derived.is_won_field(), Some("isWon"));
        assert_eq!(c.customer_role, "Potential Customer");
        assert_eq!(c.stakeholder_categories, [1000]);
    }

    #[test]
    fn empty_section_gives_the_defaults() {
        assert_eq!(parse("[sync]\n"), SyncConfig::default());
    }

    #[test]
    fn default_config_round_trips_through_toml() {
        #[derive(Serialize)]
        struct File<'a> {
            sync: &'a SyncConfig,
        }
        let text = match toml::to_string(&File {
            sync: &SyncConfig::default(),
        }) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(parse(&text), SyncConfig::default());
    }

    #[test]
    fn configured_fields_replace_the_default_mapping() {
        let c = parse(
            r#"
            [sync]
            customer_role = "Buyer"
            [[sync.fields]]
            dynamics = "name"
            marketo = "name"
            conversion = "string"
            [[sync.fields]]
            dynamics = "opportunityratingcode"
            marketo = "rating"
            conversion = "optionset_label"
            labels = { "1" = "Hot", "2" = "Warm", "3" = "Cold" }
            "#,
        );
        assert_eq!(c.problems(), Vec::<String>::new());
        assert_eq!(c.fields.len(), 2);
        assert_eq!(c.fields[1].conversion, Conversion::OptionsetLabel);
        assert_eq!(SyncConfig::label(&c.fields[1], 2), Some("Warm"));
        assert_eq!(c.customer_role, "Buyer");
    }

    #[test]
    fn unknown_key_in_sync_is_refused() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct File {
            sync: SyncConfig,
        }
        assert!(toml::from_str::<File>("[sync]\ncustomer_rol = \"x\"\n").is_err());
    }

    #[test]
    fn unknown_conversion_names_the_entry() {
        let all = problems_of(
            r#"
            [[sync.fields]]
            dynamics = "name"
            marketo = "name"
            conversion = "string"
            [[sync.fields]]
            dynamics = "estimatedvalue"
            marketo = "amount"
            conversion = "currency"
            "#,
        );
        assert!(
            all.contains("sync.fields[1] (estimatedvalue → amount): unknown conversion \"currency\""),
            "{all}"
        );
    }

    #[test]
    fn marketo_field_mapped_twice_is_a_problem() {
        let all = problems_of(
            r#"
            [[sync.fields]]
            dynamics = "estimatedvalue"
            marketo = "amount"
            conversion = "money"
            [[sync.fields]]
            dynamics = "actualvalue"
            marketo = "Amount"
            conversion = "money"
            "#,
        );
        assert!(
            all.contains("sync.fields[1] (actualvalue → Amount): Marketo field \"Amount\" is already written by sync.fields[0]"),
            "{all}"
        );
    }

    #[test]
    fn mapping_onto_a_derived_field_or_a_key_is_a_problem() {
        let all = problems_of(
            r#"
            [[sync.fields]]
            dynamics = "statecode"
            marketo = "isWon"
            conversion = "bool"
            [[sync.fields]]
            dynamics = "parentaccountid"
            marketo = "externalCompanyId"
            conversion = "lookup_id"
            [[sync.fields]]
            dynamics = "opportunityid"
            marketo = "externalOpportunityId"
            conversion = "string"
            "#,
        );
        assert!(all.contains("sync.fields[0] (statecode → isWon): Marketo field \"isWon\" is already written by sync.derived.is_won"), "{all}");
        assert!(all.contains("sync.fields[1] (parentaccountid → externalCompanyId): Marketo field \"externalCompanyId\" is already written by oppsync itself"), "{all}");
        assert!(
            all.contains("sync.fields[2] (opportunityid → externalOpportunityId)"),
            "{all}"
        );
    }

    #[test]
    fn derived_fields_sharing_a_name_is_a_problem() {
        let all = problems_of("[sync.derived]\nis_closed = \"closed\"\nis_won = \"closed\"\n");
        assert!(all.contains("sync.derived.is_won (closed)"), "{all}");
    }

    #[test]
    fn derived_field_can_be_turned_off_with_an_empty_name() {
        let c = parse("[sync.derived]\nis_won = \"\"\n");
        assert_eq!(c.problems(), Vec::<String>::new());
        assert_eq!(c.derived.is_won_field(), None);
        assert_eq!(c.derived.is_closed_field(), Some("isClosed"));
    }

    #[test]
    fn optionset_label_without_labels_is_a_problem() {
        let all = problems_of(
            "[[sync.fields]]\ndynamics = \"salesstage\"\nmarketo = \"stage\"\nconversion = \"optionset_label\"\n",
        );
        assert!(
            all.contains("sync.fields[0] (salesstage → stage): conversion optionset_label needs `labels`"),
            "{all}"
        );
    }

    #[test]
    fn label_keys_that_are_not_integers_are_a_problem() {
        let all = problems_of(
            "[[sync.fields]]\ndynamics = \"salesstage\"\nmarketo = \"stage\"\nconversion = \"optionset_label\"\nlabels = { \"0\" = \"Qualify\", \"one\" = \"Develop\" }\n",
        );
        assert!(
            all.contains("sync.fields[0] (salesstage → stage): label key \"one\" is not an option value"),
            "{all}"
        );
        assert!(!all.contains("\"0\""), "{all}");
    }

    #[test]
    fn labels_on_another_conversion_are_a_problem() {
        let all = problems_of(
            "[[sync.fields]]\ndynamics = \"salesstage\"\nmarketo = \"stage\"\nconversion = \"optionset_value\"\nlabels = { \"0\" = \"Qualify\" }\n",
        );
        assert!(
            all.contains(
                "sync.fields[0] (salesstage → stage): `labels` only apply to conversion optionset_label"
            ),
            "{all}"
        );
    }

    #[test]
    fn empty_names_are_problems() {
        let all = problems_of(
            "[sync]\ncustomer_role = \" \"\n[[sync.fields]]\ndynamics = \"\"\nmarketo = \"\"\nconversion = \"string\"\n",
        );
        assert!(
            all.contains("sync.fields[0] ( → ): `dynamics` (the Dynamics attribute) is empty"),
            "{all}"
        );
        assert!(
            all.contains("sync.fields[0] ( → ): `marketo` (the Marketo field) is empty"),
            "{all}"
        );
        assert!(all.contains("sync.customer_role: must not be empty"), "{all}");
    }

    #[test]
    fn customer_role_longer_than_marketo_allows_is_a_problem() {
        let c = SyncConfig {
            customer_role: "x".repeat(51),
            ..SyncConfig::default()
        };
        assert_eq!(c.problems().len(), 1);
        assert!(c.problems()[0].starts_with("sync.customer_role"));
    }

    #[test]
    fn lead_match_field_without_lead_match_field_is_a_problem() {
        let all = problems_of("[sync]\nlead_match = \"field\"\n");
        assert!(all.contains("sync.lead_match_field: required"), "{all}");
        let ok = parse(
            "[sync]\nlead_match = \"field\"\nlead_match_field = \"dynamicsContactId\"\nmissing_lead = \"dead_letter\"\n",
        );
        assert_eq!(ok.problems(), Vec::<String>::new());
        assert_eq!(ok.missing_lead, MissingLead::DeadLetter);
    }

    #[test]
    fn opportunity_attributes_are_mapped_fields_plus_what_the_rules_need() {
        let c = SyncConfig {
            fields: vec![FieldMapping::new("estimatedvalue", "amount", Conversion::Money)],
            ..SyncConfig::default()
        };
        assert_eq!(
            c.opportunity_attributes(),
            ["customerid", "estimatedvalue", "modifiedon", "name", "statecode"]
        );
    }
}
