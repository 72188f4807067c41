//! Typed values of flags and arguments, each with its validation: `--chmod`, durations,
//! `--mount`, `--network`, `--security`, `--checksum`, EXPOSE ports, STOPSIGNAL.

use std::time::Duration;

pub use kiln_plan::{CacheSharing, Chmod, Mount, MountType, NetworkMode, SecurityMode, Source};

/// Parses a Go duration (`1m30s`, `1.5h`, `300ms`, `0`) as HEALTHCHECK's flags take it, and
/// applies Docker's rule that a non-zero interval is at least 1ms.
pub(crate) fn parse_duration(value: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {value:?}");
    let (negative, mut s) = match value.as_bytes().first() {
        Some(b'-') => (true, &value[1..]),
        Some(b'+') => (false, &value[1..]),
        _ => (false, value),
    };
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let int_part = &s[..int_len];
        s = &s[int_len..];
        let mut frac_part = "";
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            frac_part = &rest[..frac_len];
            s = &rest[frac_len..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(bad());
        }
        let unit_len = s
            .char_indices()
            .find(|&(_, c)| c == '.' || c.is_ascii_digit())
            .map_or(s.len(), |(i, _)| i);
        let unit = &s[..unit_len];
        s = &s[unit_len..];
        let nanos_per: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("missing unit in duration {value:?}")),
            other => return Err(format!("unknown unit {other:?} in duration {value:?}")),
        };
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| bad())?
        };
        let mut nanos = int.checked_mul(nanos_per).ok_or_else(bad)?;
        let mut scale = nanos_per;
        for d in frac_part.bytes().take(30) {
            scale /= 10;
            nanos += u128::from(d - b'0') * scale;
        }
        total = total.checked_add(nanos).ok_or_else(bad)?;
        if total > i64::MAX as u128 {
            return Err(bad());
        }
    }
    if total == 0 {
        return Ok(Duration::ZERO);
    }
    if negative || total < 1_000_000 {
        return Err(format!("{value:?} cannot be less than 1ms"));
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Parses a `RUN --network` value.
pub(crate) fn parse_network_mode(value: &str) -> Result<NetworkMode, String> {
    match value {
        "default" => Ok(NetworkMode::Default),
        "none" => Ok(NetworkMode::None),
        "host" => Ok(NetworkMode::Host),
        other => Err(format!(
            "unsupported network mode {other:?} (expected default, none or host)"
        )),
    }
}

/// Parses a `RUN --security` value.
pub(crate) fn parse_security_mode(value: &str) -> Result<SecurityMode, String> {
    match value {
        "sandbox" => Ok(SecurityMode::Sandbox),
        "insecure" => Ok(SecurityMode::Insecure),
        other => Err(format!(
            "unsupported security mode {other:?} (expected sandbox or insecure)"
        )),
    }
}

/// Parses a `--mount` `type=` value.
fn parse_mount_type(value: &str) -> Result<MountType, String> {
    match value.to_ascii_lowercase().as_str() {
        "bind" => Ok(MountType::Bind),
        "cache" => Ok(MountType::Cache),
        "tmpfs" => Ok(MountType::Tmpfs),
        "secret" => Ok(MountType::Secret),
        "ssh" => Ok(MountType::Ssh),
        _ => Err(format!(
            "unsupported mount type {value:?} (expected bind, cache, tmpfs, secret or ssh)"
        )),
    }
}

/// Splits a CSV record (the `--mount` syntax): comma-separated, `"` quotes a field, `""` is a
/// quote inside a quoted field.
fn csv_fields(value: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("extraneous or missing \" in quoted field".to_string()),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                }
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(',') => fields.push(field),
                Some(_) => return Err("extraneous or missing \" in quoted field".to_string()),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field);
                        return Ok(fields);
                    }
                    Some(',') => {
                        fields.push(field);
                        break;
                    }
                    Some('"') => return Err("bare \" in non-quoted field".to_string()),
                    Some(c) => field.push(c),
                }
            }
        }
    }
}

/// The raw `from=` value of a `--mount`, if it has one.
pub(crate) fn mount_from(value: &str) -> Option<String> {
    csv_fields(value).ok()?.into_iter().find_map(|field| {
        let (k, v) = field.split_once('=')?;
        k.eq_ignore_ascii_case("from").then(|| v.to_string())
    })
}

/// Go's `strconv.ParseBool`.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Docker's `RAMInBytes`: `64m`, `1g`, `1.5GiB`, `1024` (powers of 1024).
fn parse_size(value: &str) -> Option<u64> {
    let num_len = value
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_digit() || c == '.'))
        .map_or(value.len(), |(i, _)| i);
    let (num, unit) = value.split_at(num_len);
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.contains("..") {
        return None;
    }
    let number: f64 = num
        .split('.')
        .take(2)
        .collect::<Vec<_>>()
        .join(".")
        .parse()
        .ok()?;
    let unit = unit.strip_prefix(' ').unwrap_or(unit).to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let multiplier: f64 = match unit {
        "" => 1.0,
        "k" => 1024.0,
        "m" => 1024f64.powi(2),
        "g" => 1024f64.powi(3),
        "t" => 1024f64.powi(4),
        "p" => 1024f64.powi(5),
        _ => return None,
    };
    let bytes = number * multiplier;
    (bytes.is_finite() && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Parses one `--mount` value whose field values are already expanded; `resolve` maps a
/// `from=` value to a stage or image.
pub(crate) fn parse_mount(
    value: &str,
    expand: &mut dyn FnMut(&str) -> Result<String, String>,
    resolve: &mut dyn FnMut(&str) -> Result<Source, String>,
) -> Result<Mount, String> {
    let fields = csv_fields(value)?;
    // Field values are expanded one by one, after the CSV split, like BuildKit does.
    let fields = fields
        .into_iter()
        .map(|field| match field.split_once('=') {
            Some((k, v)) => Ok(format!("{k}={}", expand(v)?)),
            None => Ok(field),
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut kind = MountType::Bind;
    for field in &fields {
        if let Some((key, v)) = field.split_once('=') {
            if key.eq_ignore_ascii_case("type") {
                kind = parse_mount_type(v)?;
            }
        }
    }
    let mut fields_read = MountFields {
        mount: Mount {
            kind,
            target: String::new(),
            source: None,
            from: None,
            read_only: false,
            id: None,
            sharing: CacheSharing::Shared,
            mode: None,
            uid: None,
            gid: None,
            size: None,
            required: false,
            env: None,
        },
        read_only: None,
        sharing_set: false,
    };
    for field in &fields {
        fields_read.apply(field, resolve)?;
    }
    fields_read.finish()
}

/// A `--mount` as its fields are read, with what the checks after the last field need.
struct MountFields {
    mount: Mount,
    /// `readonly`/`readwrite` when given; the default depends on the type.
    read_only: Option<bool>,
    /// Whether `sharing` was given (only cache mounts take it).
    sharing_set: bool,
}

impl MountFields {
    /// Applies one `key=value` or bare `key` field.
    fn apply(
        &mut self,
        field: &str,
        resolve: &mut dyn FnMut(&str) -> Result<Source, String>,
    ) -> Result<(), String> {
        let kind = self.mount.kind;
        let m = &mut self.mount;
        let (key, value) = match field.split_once('=') {
            Some((k, v)) => (k.to_ascii_lowercase(), Some(v)),
            None => (field.to_ascii_lowercase(), None),
        };
        let Some(value) = value else {
            match key.as_str() {
                "readonly" | "ro" => self.read_only = Some(true),
                "readwrite" | "rw" => self.read_only = Some(false),
                "required" if matches!(kind, MountType::Secret | MountType::Ssh) => {
                    m.required = true
                }
                "required" => return Err(wrong_mount_key(&key, kind)),
                _ => return Err(format!("invalid field '{field}' must be a key=value pair")),
            }
            return Ok(());
        };
        let bool_value =
            |v: &str| parse_bool(v).ok_or_else(|| format!("invalid value for {key}: {v}"));
        match key.as_str() {
            "type" => {}
            "from" => {
                if !matches!(kind, MountType::Bind | MountType::Cache) {
                    return Err(format!("from is not allowed for {kind} mounts"));
                }
                m.from = Some(resolve(value)?);
            }
            "source" | "src" => m.source = Some(value.to_string()),
            "target" | "dst" | "destination" => m.target = value.to_string(),
            "readonly" | "ro" => self.read_only = Some(bool_value(value)?),
            "readwrite" | "rw" => self.read_only = Some(!bool_value(value)?),
            "required" => {
                if !matches!(kind, MountType::Secret | MountType::Ssh) {
                    return Err(wrong_mount_key(&key, kind));
                }
                m.required = bool_value(value)?;
            }
            "size" => {
                if kind != MountType::Tmpfs {
                    return Err(wrong_mount_key(&key, kind));
                }
                m.size = Some(parse_size(value).ok_or_else(|| format!("invalid size {value:?}"))?);
            }
            "id" => m.id = Some(value.to_string()),
            "sharing" => {
                m.sharing = match value.to_ascii_lowercase().as_str() {
                    "shared" => CacheSharing::Shared,
                    "private" => CacheSharing::Private,
                    "locked" => CacheSharing::Locked,
                    _ => return Err(format!("unsupported sharing value {value:?}")),
                };
                self.sharing_set = true;
            }
            "mode" => {
                let mode = u32::from_str_radix(value, 8)
                    .map_err(|_| format!("invalid value {value} for mode"))?;
                m.mode = Some(mode);
            }
            "uid" => {
                m.uid = Some(
                    value
                        .parse()
                        .map_err(|_| format!("invalid value {value} for uid"))?,
                )
            }
            "gid" => {
                m.gid = Some(
                    value
                        .parse()
                        .map_err(|_| format!("invalid value {value} for gid"))?,
                )
            }
            "env" => {
                if kind != MountType::Secret {
                    return Err(wrong_mount_key(&key, kind));
                }
                m.env = Some(value.to_string());
            }
            _ => return Err(format!("unexpected key '{key}' in '{field}'")),
        }
        Ok(())
    }

    /// Checks the combination of fields and fills in the type's defaults (read-only, the
    /// cache id, the secret id and target, the ssh id).
    fn finish(self) -> Result<Mount, String> {
        let MountFields {
            mount: mut m,
            read_only,
            sharing_set,
        } = self;
        let kind = m.kind;
        let file_info_allowed =
            matches!(kind, MountType::Secret | MountType::Ssh | MountType::Cache);
        if !file_info_allowed {
            for (name, set) in [
                ("mode", m.mode.is_some()),
                ("uid", m.uid.is_some()),
                ("gid", m.gid.is_some()),
            ] {
                if set {
                    return Err(format!("{name} not allowed for \"{kind}\" type mounts"));
                }
            }
        }
        if sharing_set && kind != MountType::Cache {
            return Err(format!("invalid cache sharing set for {kind} mount"));
        }
        m.read_only = read_only.unwrap_or(!matches!(kind, MountType::Cache | MountType::Tmpfs));
        match kind {
            MountType::Bind | MountType::Cache | MountType::Tmpfs => {
                if m.target.is_empty() {
                    return Err(format!("{kind} mount requires a target"));
                }
                if kind == MountType::Cache && m.id.is_none() {
                    m.id = Some(m.target.clone());
                }
            }
            MountType::Secret => {
                if m.source.is_none() && m.target.is_empty() && m.id.is_none() && m.env.is_none() {
                    return Err("invalid secret mount. one of source, target required".to_string());
                }
                if m.source.is_some() && m.id.is_some() {
                    return Err("both source and id can't be set".to_string());
                }
                if m.id.is_none() {
                    let from_path = m.source.clone().unwrap_or_else(|| m.target.clone());
                    let base = from_path.rsplit('/').next().unwrap_or_default().to_string();
                    m.id = Some(if base.is_empty() { from_path } else { base });
                }
                if m.target.is_empty() && m.env.is_none() {
                    m.target = format!("/run/secrets/{}", m.id.as_deref().unwrap_or_default());
                }
            }
            MountType::Ssh => {
                if m.id.is_none() {
                    m.id = Some("default".to_string());
                }
            }
        }
        Ok(m)
    }
}

/// The error for a key the mount type does not take.
fn wrong_mount_key(key: &str, kind: MountType) -> String {
    format!("unexpected key '{key}' for mount type '{kind}'")
}

/// `ADD --checksum`: a digest (`sha256:<64 hex>`, `sha384:`, `sha512:`).
pub(crate) fn validate_checksum(value: &str) -> Result<(), String> {
    let (algorithm, hex) = value.split_once(':').ok_or_else(|| {
        format!("invalid checksum {value:?}: expected ALGORITHM:HEX, like sha256:...")
    })?;
    let len = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        other => return Err(format!("unsupported checksum algorithm {other:?}")),
    };
    if hex.len() != len
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "invalid checksum {value:?}: expected {len} lowercase hex digits"
        ));
    }
    Ok(())
}

/// A transport protocol of an exposed port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

/// An EXPOSE entry: one port or a range, with a protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Port {
    /// First port.
    pub start: u16,
    /// Last port (equal to `start` for a single port).
    pub end: u16,
    /// Protocol.
    pub protocol: Protocol,
}

impl Port {
    /// Parses `80`, `80/udp`, `8000-8010/tcp`.
    pub fn parse(value: &str) -> Result<Self, String> {
        let (ports, proto) = match value.split_once('/') {
            Some((p, proto)) => (p, proto),
            None => (value, "tcp"),
        };
        let protocol = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            _ => {
                return Err(format!(
                    "invalid protocol in port {value:?} (expected tcp, udp or sctp)"
                ))
            }
        };
        let number = |s: &str| -> Result<u16, String> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("invalid port {value:?}"));
            }
            s.parse::<u16>()
                .map_err(|_| format!("invalid port {value:?}: must be 0-65535"))
        };
        let (start, end) = match ports.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let p = number(ports)?;
                (p, p)
            }
        };
        if end < start {
            return Err(format!("invalid port range {value:?}"));
        }
        Ok(Port {
            start,
            end,
            protocol,
        })
    }
}

const SIGNALS: &[&str] = &[
    "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT", "KILL",
    "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM", "TRAP", "TSTP",
    "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ", "RTMIN", "RTMAX",
];

/// STOPSIGNAL: a signal number (1-255) or name (`SIGTERM`, `TERM`, `RTMIN+3`).
pub(crate) fn validate_signal(value: &str) -> Result<(), String> {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return match value.parse::<u8>() {
            Ok(n) if n > 0 => Ok(()),
            _ => Err(format!("invalid signal: {value}")),
        };
    }
    let upper = value.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let known = SIGNALS.contains(&name)
        || ["RTMIN+", "RTMAX-"].iter().any(|p| {
            name.strip_prefix(p)
                .and_then(|n| n.parse::<u8>().ok())
                .is_some_and(|n| (1..=15).contains(&n))
        });
    if known {
        Ok(())
    } else {
        Err(format!("invalid signal: {value}"))
    }
}

/// The closest candidate to `name` (case-insensitive), when it is close enough to be a typo.
pub(crate) fn suggest<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let name = name.to_lowercase();
    let max = if name.chars().count() <= 3 { 1 } else { 2 };
    candidates
        .into_iter()
        .map(|c| (levenshtein(&name, &c.to_lowercase()), c))
        .filter(|&(d, _)| d > 0 && d <= max)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chmod() {
        assert_eq!(Chmod::parse("755"), Ok(Chmod::Octal(0o755)));
        assert_eq!(Chmod::parse("0644"), Ok(Chmod::Octal(0o644)));
        assert!(Chmod::parse("17777").is_err());
        assert!(Chmod::parse("789").is_err());
        assert_eq!(
            Chmod::parse("u+x,go=rx"),
            Ok(Chmod::Symbolic("u+x,go=rx".into()))
        );
        assert!(Chmod::parse("u+q").is_err());
        assert!(Chmod::parse("").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("10us").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration(".s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("64m"), Some(64 << 20));
        assert_eq!(parse_size("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_size("1x"), None);
    }

    #[test]
    fn suggestions() {
        let names = ["run", "copy", "from"];
        assert_eq!(suggest("RUNN", names), Some("run"));
        assert_eq!(suggest("CPY", names), Some("copy"));
        assert_eq!(suggest("frob", names), Some("from"));
        assert_eq!(suggest("xyzzy", names), None);
    }
}
