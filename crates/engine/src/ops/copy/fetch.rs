//! ADD of an `http://` or `https://` URL: the body is streamed to a file (never held in
//! memory) and digested on the way; with `--checksum` a mismatch is an error and the file is
//! removed, so nothing reaches the image. Docker's rules: the file is named after the last
//! segment of the URL path (`__unnamed__` when there is none), has mode 0600, and takes its
//! modification time from `Last-Modified` when the server sends one. Downloads are never
//! extracted.
//!
//! For the layer cache, [`probe`] asks the server (`HEAD`) for the validators that identify
//! the content it would send now, and [`download`] reports the validators its `GET` came
//! with, so the engine can tell whether what it downloaded is what it keyed.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use kiln_oci::Digest;

/// The file name ADD gives a download: the last segment of the URL's path, or `__unnamed__`.
pub(crate) fn file_name_for(url: &url::Url) -> String {
    url.path_segments()
        .and_then(|mut segments| segments.next_back().map(str::to_owned))
        .filter(|name| !name.is_empty() && name != "." && name != "..")
        .map(|name| percent_decode(&name))
        .filter(|name| !name.is_empty() && name != "." && name != ".." && !name.contains('/'))
        .unwrap_or_else(|| "__unnamed__".to_owned())
}

/// Decodes `%XX` escapes (the URL keeps its path encoded; the file name is the decoded text,
/// as Go's `url.URL.Path` gives it to BuildKit).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&hi), Some(&lo)) if hex(hi).is_some() && hex(lo).is_some() => {
                out.push((hex(hi).unwrap_or(0) * 16 + hex(lo).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a server says identifies the content of a URL: a strong `ETag` and `Last-Modified`.
/// Two responses with the same non-empty validators carry the same content (RFC 9110,
/// section 8.8); a weak `ETag` (`W/"..."`) promises only equivalence, so it is not kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Validators {
    /// The strong `ETag`, quotes included.
    pub etag: Option<String>,
    /// `Last-Modified`, as sent.
    pub last_modified: Option<String>,
}

impl Validators {
    fn of(headers: &reqwest::header::HeaderMap) -> Validators {
        let text = |name| {
            headers
                .get(name)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        Validators {
            etag: text(reqwest::header::ETAG).filter(|tag| !tag.starts_with("W/")),
            last_modified: text(reqwest::header::LAST_MODIFIED),
        }
    }

    /// Whether the server sent nothing that pins the content.
    pub(crate) fn is_empty(&self) -> bool {
        self.etag.is_none() && self.last_modified.is_none()
    }
}

/// A finished download.
#[derive(Debug, Clone)]
pub(crate) struct Downloaded {
    /// The file, named as ADD names it.
    pub path: PathBuf,
    /// The SHA-256 (or the `--checksum` algorithm's digest) of the body.
    pub digest: Digest,
    /// The validators the response came with.
    pub validators: Validators,
}

/// One HTTP client for every fetch of the process: building one reads the TLS roots.
fn client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    if let Some(client) = CLIENT.get() {
        return Ok(client);
    }
    let built = reqwest::Client::builder()
        .use_rustls_tls()
        .build()
        .map_err(|e| format!("cannot create an HTTP client: {e}"))?;
    Ok(CLIENT.get_or_init(|| built))
}

/// Asks the server for `source`'s validators without downloading it (`HEAD`). A server that
/// refuses `HEAD` (presigned URLs are often signed for `GET` only) is an error; the caller
/// then downloads instead.
pub(crate) async fn probe(source: &str) -> Result<Validators, String> {
    let response = request(source, reqwest::Method::HEAD).await?;
    Ok(Validators::of(response.headers()))
}

/// Sends one `method` request for `source`; an answer that is not a success is an error
/// naming the URL and the status.
async fn request(source: &str, method: reqwest::Method) -> Result<reqwest::Response, String> {
    let url = url::Url::parse(source).map_err(|e| format!("{source}: not a valid URL: {e}"))?;
    let response = client()
        .map_err(|e| format!("{source}: {e}"))?
        .request(method, url)
        .send()
        .await
        .map_err(|e| format!("{source}: {}", error_chain(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("{source}: the server answered HTTP {status}"));
    }
    Ok(response)
}

/// Downloads `source` into the directory `dir`. With `checksum` (`sha256:HEX`), the body must
/// hash to it, else the file is removed and the error names the URL and both digests.
pub(crate) async fn download(
    source: &str,
    checksum: Option<&str>,
    dir: &Path,
) -> Result<Downloaded, String> {
    let url = url::Url::parse(source).map_err(|e| format!("{source}: not a valid URL: {e}"))?;
    let expected = checksum
        .map(|c| Digest::parse(c).map_err(|e| format!("--checksum={c}: not a valid digest: {e}")))
        .transpose()?;
    let mut response = request(source, reqwest::Method::GET).await?;
    let validators = Validators::of(response.headers());
    let modified = validators
        .last_modified
        .as_deref()
        .and_then(parse_http_date);

    let path = dir.join(file_name_for(&url));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let algorithm = expected
        .as_ref()
        .map_or(kiln_oci::Algorithm::Sha256, Digest::algorithm);
    let mut hasher = kiln_oci::Hasher::new(algorithm);
    let streamed: Result<(), String> = async {
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("{source}: reading the body: {}", error_chain(&e)))?
        {
            hasher.update(&chunk);
            file.write_all(&chunk)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    }
    .await;
    let result = streamed.and_then(|()| {
        let actual = hasher.finish();
        if let Some(expected) = &expected {
            if *expected != actual {
                return Err(format!(
                    "{source}: checksum mismatch: expected {expected}, the downloaded content hashes to {actual}"
                ));
            }
        }
        // An explicit mode: the process umask must not decide it.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(time) = modified {
            file.set_modified(time)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(actual)
    });
    drop(file);
    match result {
        Ok(digest) => Ok(Downloaded {
            path,
            digest,
            validators,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// A reqwest error with its causes (the top-level message alone says little).
fn error_chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Parses an HTTP date in the preferred IMF-fixdate form (`Sun, 06 Nov 1994 08:49:37 GMT`,
/// RFC 9110 section 5.6.7), the only form servers may send today.
pub(crate) fn parse_http_date(text: &str) -> Option<SystemTime> {
    // HTTP's IMF-fixdate is RFC 2822's date form in GMT; RFC 2822 also allows forms HTTP
    // dates never take (numeric zones), which a server would not send.
    jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(text.trim())
        .ok()
        .map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::time::Duration;

    #[test]
    fn http_dates_parse() {
        let t = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            784_111_777
        );
        assert!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT").is_none());
        assert!(parse_http_date("garbage").is_none());
    }

    #[test]
    fn names_of_downloads() {
        let name = |s: &str| file_name_for(&url::Url::parse(s).unwrap());
        assert_eq!(name("http://h/dir/file.tar.gz?x=1"), "file.tar.gz");
        assert_eq!(name("http://h/"), "__unnamed__");
        assert_eq!(name("http://h"), "__unnamed__");
        assert_eq!(name("http://h/a%20b"), "a b");
    }

    #[tokio::test]
    async fn downloads_verify_the_checksum_and_write_nothing_on_mismatch() {
        let served = tempfile::tempdir().unwrap();
        std::fs::write(served.path().join("payload.bin"), b"payload\n").unwrap();
        let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
        std::fs::File::options()
            .write(true)
            .open(served.path().join("payload.bin"))
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let server = kiln_testkit::http::StaticServer::start(served.path());
        let url = format!("{}/payload.bin", server.url());
        let good = Digest::sha256_of(b"payload\n").to_string();

        let out = tempfile::tempdir().unwrap();
        let downloaded = download(&url, Some(&good), out.path()).await.unwrap();
        let path = downloaded.path;
        assert_eq!(path, out.path().join("payload.bin"));
        assert_eq!(downloaded.digest.to_string(), good);
        let modified = downloaded.validators.last_modified.expect("Last-Modified");
        assert_eq!(parse_http_date(&modified), Some(mtime));
        assert_eq!(probe(&url).await.unwrap().last_modified, Some(modified));
        assert_eq!(std::fs::read(&path).unwrap(), b"payload\n");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(meta.mtime(), 1_600_000_000, "mtime from Last-Modified");

        let bad = Digest::sha256_of(b"something else").to_string();
        let out = tempfile::tempdir().unwrap();
        let err = download(&url, Some(&bad), out.path()).await.unwrap_err();
        assert!(err.contains(&url), "{err}");
        assert!(err.contains(&bad), "{err}");
        assert!(err.contains(&good), "{err}");
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);

        let err = download(&format!("{}/missing", server.url()), None, out.path())
            .await
            .unwrap_err();
        assert!(err.contains("404"), "{err}");
    }
}
