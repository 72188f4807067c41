//! A tarball downloaded over HTTP(S) (`https://host/ctx.tar.gz`), extracted as it arrives.
//!
//! The body is never held whole: chunks flow through a small bounded channel to a blocking
//! thread that decompresses and extracts them, so a large context costs disk, not memory.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{blocking, new_workspace, redactor, ContextSource, Materialized};
use crate::archive::{decompress_auto, extract_tar};
use crate::error::{ContextError, Result};
use crate::redact::Redactor;

/// How many body chunks may wait for the extractor before the download pauses.
const CHANNEL_DEPTH: usize = 16;

/// A context tarball fetched from an HTTP(S) URL.
#[derive(Debug, Clone)]
pub struct HttpTarballSource {
    url: String,
    ca_certificates: Vec<PathBuf>,
    redactor: Redactor,
}

impl HttpTarballSource {
    /// A context downloaded from `url`, trusting the system roots plus the PEM certificates in
    /// `ca_certificates`.
    pub fn new(url: String, ca_certificates: Vec<PathBuf>) -> Self {
        let redactor = redactor(&url);
        HttpTarballSource {
            url,
            ca_certificates,
            redactor,
        }
    }

    fn client(&self) -> Result<reqwest::Client> {
        let mut builder = reqwest::Client::builder().use_rustls_tls();
        for path in &self.ca_certificates {
            let pem = std::fs::read(path).map_err(|e| ContextError::CaCertificate {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ContextError::CaCertificate {
                    path: path.clone(),
                    message: error_chain(&e),
                }
            })?;
            if certificates.is_empty() {
                return Err(ContextError::CaCertificate {
                    path: path.clone(),
                    message: "no PEM certificate found".to_owned(),
                });
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        builder.build().map_err(|e| ContextError::Http {
            source_name: self.describe(),
            url: self.redactor.redact(&self.url),
            message: error_chain(&e),
        })
    }

    fn transport_error(&self, error: &reqwest::Error) -> ContextError {
        ContextError::Http {
            source_name: self.describe(),
            url: self.redactor.redact(&self.url),
            message: self.redactor.redact(&error_chain(error)),
        }
    }
}

/// A reqwest error and its causes, without the URL reqwest would add (it is named separately,
/// redacted).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        let text = match e.downcast_ref::<reqwest::Error>() {
            Some(re) => {
                let text = re.to_string();
                match re.url() {
                    Some(url) => text
                        .replace(&format!(" ({url})"), "")
                        .replace(url.as_str(), "<url>"),
                    None => text,
                }
            }
            None => e.to_string(),
        };
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

impl ContextSource for HttpTarballSource {
    fn describe(&self) -> String {
        let scheme = if self.url.starts_with("http://") {
            "http"
        } else {
            "https"
        };
        format!(
            "{scheme} tarball context {}",
            self.redactor.redact(&self.url)
        )
    }

    fn materialize<'a>(&'a self, work_dir: &'a Path) -> BoxFuture<'a, Result<Materialized>> {
        Box::pin(async move {
            let name = self.describe();
            let client = self.client()?;
            let response = client
                .get(&self.url)
                .send()
                .await
                .map_err(|e| self.transport_error(&e))?;
            let status = response.status();
            if !status.is_success() {
                return Err(ContextError::HttpStatus {
                    source_name: name,
                    url: self.redactor.redact(&self.url),
                    status: status.as_u16(),
                });
            }

            let workspace = new_workspace(work_dir, "context-https-", &name)?;
            let dest = workspace.path().to_path_buf();
            let (sender, receiver) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_DEPTH);
            let worker_name = name.clone();
            let extraction = tokio::spawn({
                let name = name.clone();
                async move {
                    blocking(&name, move || {
                        let reader =
                            decompress_auto(ChannelReader::new(receiver)).map_err(|error| {
                                ContextError::Archive {
                                    source_name: worker_name.clone(),
                                    error,
                                }
                            })?;
                        extract_tar(reader, &dest, &worker_name)
                    })
                    .await
                }
            });

            let mut body = response.bytes_stream();
            let mut download_error = None;
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(bytes) => {
                        if sender.send(Ok(bytes)).await.is_err() {
                            // The extractor stopped early; its own error explains why.
                            break;
                        }
                    }
                    Err(e) => {
                        let error = self.transport_error(&e);
                        let _ = sender
                            .send(Err(io::Error::other("download interrupted")))
                            .await;
                        download_error = Some(error);
                        break;
                    }
                }
            }
            drop(sender);
            let extracted = match extraction.await {
                Ok(result) => result,
                Err(join) => Err(ContextError::Archive {
                    source_name: name.clone(),
                    error: io::Error::other(format!("extraction task failed: {join}")),
                }),
            };
            if let Some(error) = download_error {
                return Err(error);
            }
            extracted?;
            let root = workspace.path().to_path_buf();
            Ok(Materialized::owned(root, workspace))
        })
    }
}

/// A blocking `Read` over body chunks sent from the async side.
struct ChannelReader {
    receiver: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl ChannelReader {
    fn new(receiver: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        ChannelReader {
            receiver,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(Ok(bytes)) => self.current = bytes,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
