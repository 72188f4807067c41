//! Conversions between Kiln's image documents and the `oci-spec` crate's
//! (`oci_spec::image`), for tools that embed Kiln and already speak `oci-spec`.
//!
//! Kiln keeps its own types inside: they keep Docker's extra config fields and serialise to the
//! canonical bytes that digests are computed over. The conversions go through each document's
//! JSON form, which both sides define by the OCI image specification, so a field means the same
//! thing on either side. What `oci-spec` does not model (Docker-only config keys such as
//! `container_config`) is left out when converting to it.

use crate::image::{Descriptor, ImageConfig, Index, Manifest};

/// Why a document could not be converted: one side has a value the other cannot hold.
#[derive(Debug, thiserror::Error)]
#[error("converting {what} to or from oci-spec: {source}")]
pub struct InteropError {
    /// The document kind (`image config`, `manifest`, `index`, `descriptor`).
    pub what: &'static str,
    /// The JSON error that says which field.
    #[source]
    pub source: serde_json::Error,
}

fn convert<A: serde::Serialize, B: serde::de::DeserializeOwned>(
    what: &'static str,
    value: &A,
) -> Result<B, InteropError> {
    serde_json::to_value(value)
        .and_then(serde_json::from_value)
        .map_err(|source| InteropError { what, source })
}

macro_rules! both_ways {
    ($kiln:ty, $spec:ty, $what:literal) => {
        impl TryFrom<&$kiln> for $spec {
            type Error = InteropError;
            fn try_from(value: &$kiln) -> Result<$spec, InteropError> {
                convert($what, value)
            }
        }

        impl TryFrom<&$spec> for $kiln {
            type Error = InteropError;
            fn try_from(value: &$spec) -> Result<$kiln, InteropError> {
                convert($what, value)
            }
        }
    };
}

both_ways!(
    ImageConfig,
    oci_spec::image::ImageConfiguration,
    "image config"
);
both_ways!(Manifest, oci_spec::image::ImageManifest, "manifest");
both_ways!(Index, oci_spec::image::ImageIndex, "index");
both_ways!(Descriptor, oci_spec::image::Descriptor, "descriptor");
