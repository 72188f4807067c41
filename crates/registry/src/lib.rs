//! The distribution (OCI registry) protocol for Kiln.
//!
//! A [`Client`] pulls and pushes manifests and blobs. Blobs are streamed and verified
//! against their digest in the same pass, never held whole in memory. Credentials come from
//! a Docker `config.json`, as a kubelet mounts a `kubernetes.io/dockerconfigjson` Secret
//! ([`Keychain`]), including `credsStore`/`credHelpers` helpers. Both Basic and Bearer-token
//! challenges are answered, and tokens are cached per scope. Transport follows kaniko's flags
//! ([`RegistryOptions`]): plain HTTP, skipped TLS verification, extra CAs and client
//! certificates per registry (by flag, or in certs.d directories laid out as Docker's),
//! mirrors and registry maps, retries with jittered back-off, a stall timeout and a deadline on every
//! request, and a limit on concurrent transfers.
//! Certificates are verified by webpki, except that a server certificate the user trusts as
//! itself is checked as Go's crypto/x509 checks it, whatever its basic constraints.
//!
//! Errors name the registry, the repository and the HTTP status, for example
//! `127.0.0.1:5000/app: push refused: 401 Unauthorized (UNAUTHORIZED: authentication required)`,
//! and never contain a credential or a private key. A refused certificate is described (names,
//! subject, issuer, SHA-256 fingerprint, validity) with what would make it acceptable.
//!
//! ```no_run
//! use kiln_oci::Reference;
//! use kiln_registry::{Client, FileSource, Keychain, PushBlobOptions, RegistryOptions, Repository};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let options = RegistryOptions {
//!     keychain: Keychain::from_default_locations()?,
//!     ..RegistryOptions::default()
//! };
//! let client = Client::new(options)?;
//! let reference = Reference::parse("registry.example:5000/team/app:latest")?;
//! let repo = Repository::from(&reference);
//!
//! // Pull: the manifest is verified when fetched by digest, blobs always.
//! let manifest = client.get_manifest_ref(&reference).await?;
//! println!("{} is {}", manifest.digest, manifest.media_type);
//!
//! // Push a layer from a file; skipped if present, mounted if another repo has it.
//! let layer = FileSource::new("/tmp/layer.tar.gz").await?;
//! let pushed = client.push_blob(&repo, &layer, &PushBlobOptions::default()).await?;
//! println!("layer {} ({:?})", pushed.digest, pushed.outcome);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

mod blob;
mod certificate;
mod certs_d;
mod challenge;
mod client;
mod clock;
mod credentials;
mod error;
mod options;
mod repository;
mod secret;
mod tls;
mod transport;

pub use blob::{BlobSource, BlobStream, BoxAsyncRead, BytesSource, FileSource, ReaderSource};
pub use challenge::Challenge;
pub use client::{Client, Manifest, ManifestInfo, PushBlobOptions, PushOutcome, PushedBlob};
pub use clock::Clock;
pub use credentials::{
    normalize_registry, Credential, DockerConfig, Keychain, DOCKER_HUB_AUTH_KEY,
};
pub use error::{Error, Operation, RegistryErrorBody};
pub use options::{ClientCertificate, RegistryOptions, Retry, RetryHook, UploadMode};
pub use repository::{valid_tag, Repository};
pub use secret::Secret;
