//! The platform's order and group files (`order.toml`, `group.toml`), the resolved build plan
//! (`plan.toml`), and the build-plan files buildpacks write and read.
//!
//! Own serde types rather than `libcnb-data`'s: libcnb-data models the buildpack's side, so its
//! build plan can only be written and its buildpack plan only read, and its order groups
//! require a version that `order.toml` may leave out.

use serde::{Deserialize, Serialize};

/// `order.toml`: the groups to try, in order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// The groups.
    #[serde(default)]
    pub order: Vec<OrderGroup>,
}

/// One group of an order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OrderGroup {
    /// The buildpacks of the group, in order.
    #[serde(default)]
    pub group: Vec<GroupEntry>,
}

/// A buildpack named in an order group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupEntry {
    /// Its id.
    pub id: String,
    /// Its version; with none, the only version the buildpacks directory has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Whether the group may pass without it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

/// `group.toml`: the group that passed detection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// Its buildpacks, in build order.
    #[serde(default)]
    pub group: Vec<GroupBuildpack>,
}

/// A buildpack of the group that passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupBuildpack {
    /// Its id.
    pub id: String,
    /// Its version.
    pub version: String,
    /// The Buildpack API it implements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// Its homepage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub homepage: Option<String>,
}

impl GroupBuildpack {
    /// `id@version`.
    pub fn key(&self) -> String {
        format!("{}@{}", self.id, self.version)
    }
}

/// `plan.toml`: what each buildpack of the group is to provide.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// One entry per required dependency name.
    #[serde(default)]
    pub entries: Vec<PlanEntry>,
}

/// A dependency of the resolved plan: who provides it and every requirement of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PlanEntry {
    /// The buildpacks that provide it.
    #[serde(default)]
    pub providers: Vec<Provider>,
    /// The requirements, in group order.
    #[serde(default)]
    pub requires: Vec<Require>,
}

/// A buildpack that provides a plan entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provider {
    /// Its id.
    pub id: String,
    /// Its version.
    pub version: String,
}

/// A required dependency, with the metadata the requiring buildpack attached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Require {
    /// The dependency's name.
    pub name: String,
    /// The top-level version key (deprecated since Buildpack API 0.3; refused in detect output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<toml::Value>,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: toml::Table,
}

/// A provided dependency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provide {
    /// The dependency's name.
    pub name: String,
}

/// What `bin/detect` writes to its `<plan>`: provides and requires, with `or` alternatives.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildPlan {
    /// Provided dependencies of the first alternative.
    #[serde(default)]
    pub provides: Vec<Provide>,
    /// Required dependencies of the first alternative.
    #[serde(default)]
    pub requires: Vec<Require>,
    /// Further alternatives, tried in order.
    #[serde(default)]
    pub or: Vec<PlanSections>,
}

/// One alternative of a build plan.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PlanSections {
    /// Provided dependencies.
    #[serde(default)]
    pub provides: Vec<Provide>,
    /// Required dependencies.
    #[serde(default)]
    pub requires: Vec<Require>,
}

impl BuildPlan {
    /// The alternatives in the order they are tried: the top level, then each `or`.
    pub fn alternatives(&self) -> Vec<PlanSections> {
        let mut out = vec![PlanSections {
            provides: self.provides.clone(),
            requires: self.requires.clone(),
        }];
        out.extend(self.or.iter().cloned());
        out
    }
}

/// The buildpack plan `bin/build` reads: the entries it is expected to provide.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildpackPlan {
    /// The entries.
    #[serde(default)]
    pub entries: Vec<BuildpackPlanEntry>,
}

/// One entry of a buildpack plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildpackPlanEntry {
    /// The dependency's name.
    pub name: String,
    /// The metadata the requiring buildpack attached.
    #[serde(default)]
    pub metadata: toml::Table,
}

impl Plan {
    /// The buildpack plan of buildpack `id`: every requirement of the entries it provides.
    pub fn for_buildpack(&self, id: &str) -> BuildpackPlan {
        let mut entries = Vec::new();
        for entry in &self.entries {
            if entry.providers.iter().any(|p| p.id == id) {
                entries.extend(entry.requires.iter().map(|r| BuildpackPlanEntry {
                    name: r.name.clone(),
                    metadata: r.metadata.clone(),
                }));
            }
        }
        BuildpackPlan { entries }
    }

    /// The plan without the entries a buildpack met (named in `met`), so later buildpacks
    /// only see what is still to provide.
    pub fn without_met(&self, met: &[String]) -> Plan {
        Plan {
            entries: self
                .entries
                .iter()
                .filter(|e| !e.requires.iter().any(|r| met.contains(&r.name)))
                .cloned()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::parse_toml;
    use std::path::Path;

    #[test]
    fn order_toml_with_and_without_versions() {
        let order: Order = parse_toml(
            Path::new("order.toml"),
            "[[order]]\n[[order.group]]\nid = \"a\"\nversion = \"1.0.0\"\n[[order.group]]\nid = \"b\"\noptional = true\n",
        )
        .unwrap();
        assert_eq!(order.order[0].group.len(), 2);
        assert_eq!(order.order[0].group[1].version, None);
        assert!(order.order[0].group[1].optional);
    }

    #[test]
    fn buildpack_plan_holds_the_requires_of_provided_entries() {
        let plan = Plan {
            entries: vec![
                PlanEntry {
                    providers: vec![Provider {
                        id: "p".into(),
                        version: "1".into(),
                    }],
                    requires: vec![Require {
                        name: "node".into(),
                        version: None,
                        metadata: toml::Table::new(),
                    }],
                },
                PlanEntry {
                    providers: vec![Provider {
                        id: "q".into(),
                        version: "1".into(),
                    }],
                    requires: vec![Require {
                        name: "npm".into(),
                        version: None,
                        metadata: toml::Table::new(),
                    }],
                },
            ],
        };
        assert_eq!(plan.for_buildpack("p").entries[0].name, "node");
        assert!(plan.for_buildpack("x").entries.is_empty());
        assert_eq!(plan.without_met(&["node".into()]).entries.len(), 1);
    }
}
