//! What a builder image says about itself: the `io.buildpacks.builder.metadata` label, and its
//! `/cnb/run.toml` and `/cnb/stack.toml` files naming the run image.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::files::{parse_json, parse_toml};
use crate::metadata::{RunImageRef, BUILDER_METADATA_LABEL};

/// The `io.buildpacks.builder.metadata` label document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BuilderMetadata {
    /// A description of the builder.
    #[serde(default)]
    pub description: String,
    /// The stack (older builders): its run image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<BuilderStack>,
    /// The run images (newer builders), preferred first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<RunImageRef>,
    /// The buildpacks the builder holds.
    #[serde(default)]
    pub buildpacks: Vec<BuilderBuildpack>,
    /// The lifecycle the builder holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<serde_json::Value>,
    /// What created the builder.
    #[serde(rename = "createdBy", default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<serde_json::Value>,
}

/// The stack part of builder metadata.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BuilderStack {
    /// The run image.
    #[serde(rename = "runImage", default)]
    pub run_image: RunImageRef,
}

/// A buildpack the builder holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuilderBuildpack {
    /// Its id.
    pub id: String,
    /// Its version.
    #[serde(default)]
    pub version: String,
    /// Its homepage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub homepage: Option<String>,
}

impl BuilderMetadata {
    /// Parses the label's JSON value.
    pub fn from_label(json: &str) -> Result<BuilderMetadata> {
        parse_json(Path::new(BUILDER_METADATA_LABEL), json)
    }

    /// The run image the builder names (its first `images` entry, else its stack's).
    pub fn run_image(&self) -> Option<&RunImageRef> {
        self.images
            .first()
            .or_else(|| self.stack.as_ref().map(|s| &s.run_image))
            .filter(|r| !r.image.is_empty())
    }
}

/// `/cnb/run.toml`: the run images a builder suggests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunToml {
    /// The run images, preferred first.
    #[serde(default)]
    pub images: Vec<RunImageRef>,
}

/// `/cnb/stack.toml`: the run image of an older builder.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StackToml {
    /// The run image.
    #[serde(rename = "run-image", default)]
    pub run_image: RunImageRef,
}

/// Parses `/cnb/run.toml` read from `path`.
pub fn parse_run_toml(path: &Path, text: &str) -> Result<RunToml> {
    parse_toml(path, text)
}

/// Parses `/cnb/stack.toml` read from `path`.
pub fn parse_stack_toml(path: &Path, text: &str) -> Result<StackToml> {
    parse_toml(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_label() {
        let md = BuilderMetadata::from_label(
            r#"{"description":"d","stack":{"runImage":{"image":"run:old","mirrors":["m"]}},"images":[{"image":"run:new"}],"buildpacks":[{"id":"a","version":"1.0.0"}],"lifecycle":{"version":"0.20.0"},"createdBy":{"name":"pack"}}"#,
        )
        .unwrap();
        assert_eq!(md.run_image().unwrap().image, "run:new");
        assert_eq!(md.buildpacks[0].id, "a");
        let old =
            BuilderMetadata::from_label(r#"{"stack":{"runImage":{"image":"run:old"}}}"#).unwrap();
        assert_eq!(old.run_image().unwrap().image, "run:old");
        let err = BuilderMetadata::from_label(r#"{"buildpacks":[{"id":3}]}"#).unwrap_err();
        assert!(err.to_string().contains("buildpacks[0].id"), "{err}");
    }

    #[test]
    fn run_and_stack_toml() {
        let run = parse_run_toml(
            Path::new("run.toml"),
            "[[images]]\nimage = \"r\"\nmirrors = [\"m\"]\n",
        )
        .unwrap();
        assert_eq!(run.images[0].mirrors, vec!["m"]);
        let stack =
            parse_stack_toml(Path::new("stack.toml"), "[run-image]\nimage = \"s\"\n").unwrap();
        assert_eq!(stack.run_image.image, "s");
    }
}
