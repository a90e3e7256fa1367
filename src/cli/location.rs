//! Checks where a repository lives and how to reach it, before anything is opened: the
//! repository argument (`s3://BUCKET[/PREFIX]` or a directory), S3 bucket names and endpoint
//! URLs. Every rule is checked locally, so a typo is a usage error (exit 2) that names the rule,
//! never a network error or a directory created at a surprising path.
//!
//! This module does no I/O except `local_directory`, which looks at (never creates) the
//! directory of a local repository.

use std::path::{Path, PathBuf};

use crate::error::{EngineError, ErrorKind};

/// Where a repository lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `s3://BUCKET[/PREFIX]`.
    S3 {
        /// The bucket, checked against S3's naming rules.
        bucket: String,
        /// The key prefix, without leading or trailing `/`.
        prefix: String,
    },
    /// A directory.
    Local(PathBuf),
}

fn usage(message: impl Into<String>) -> EngineError {
    EngineError::new(ErrorKind::Usage, message)
}

/// Parses a repository argument. Anything starting with `s3:` (any case) must be a valid
/// `s3://BUCKET[/PREFIX]`; another `scheme://` is refused; the rest is a directory.
///
/// # Errors
/// `Usage`, naming the rule that is broken.
pub fn parse(text: &str) -> Result<Location, EngineError> {
    const FORM: &str = "s3://BUCKET[/PREFIX]";
    if text.len() >= 3 && text[..3].eq_ignore_ascii_case("s3:") {
        let Some(rest) = text.strip_prefix("s3://") else {
            return Err(usage(format!(
                "repository {text:?} starts like an S3 location but is not {FORM} (two slashes \
                 after a lower-case s3:); a local directory whose name starts with s3: can be \
                 given as ./{text}"
            )));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        check_bucket(bucket).map_err(|rule| usage(format!("repository {text:?}: {rule}")))?;
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            for segment in prefix.split('/') {
                if segment.is_empty() || segment == "." || segment == ".." {
                    return Err(usage(format!(
                        "repository {text:?}: the prefix has an empty, '.' or '..' segment"
                    )));
                }
            }
            if prefix.chars().any(char::is_control) {
                return Err(usage(format!(
                    "repository {text:?}: the prefix has control characters"
                )));
            }
        }
        return Ok(Location::S3 { bucket: bucket.to_owned(), prefix: prefix.to_owned() });
    }
    let path = text.strip_prefix("file://").unwrap_or(text);
    if path.is_empty() {
        return Err(usage(
            "repository path is empty: pass --repo s3://BUCKET/PREFIX or --repo DIR",
        ));
    }
    if let Some((scheme, _)) = path.split_once("://") {
        return Err(usage(format!(
            "repository {text:?} has scheme {scheme}://; ferry reads {FORM} or a directory"
        )));
    }
    Ok(Location::Local(PathBuf::from(path)))
}

/// Checks an S3 bucket name against the rules every S3 store shares: 3 to 63 characters of
/// lower-case letters, digits, `.` and `-`, starting and ending with a letter or digit, no `..`,
/// not an IPv4 address.
///
/// # Errors
/// The rule that is broken, as a sentence.
pub fn check_bucket(bucket: &str) -> Result<(), String> {
    const RULE: &str = "a bucket name is 3 to 63 lower-case letters, digits, '.' and '-', \
                        starting and ending with a letter or digit";
    let valid_bytes = bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    let ends_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if bucket.is_empty() {
        return Err(format!("the bucket is missing; {RULE}"));
    }
    if !(3..=63).contains(&bucket.len())
        || !valid_bytes
        || !ends_ok(bucket.as_bytes().first())
        || !ends_ok(bucket.as_bytes().last())
    {
        return Err(format!("bucket {bucket:?} is not a valid name: {RULE}"));
    }
    if bucket.contains("..") || bucket.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(format!("bucket {bucket:?} is not a valid name: no '..', not an IP address"));
    }
    Ok(())
}

/// Checks an S3 endpoint URL: `http://` or `https://`, a host, an optional port from 1 to 65535,
/// and nothing else (no credentials, path, query or fragment). The message never repeats what
/// precedes an `@` (it may be a password).
///
/// # Errors
/// `Usage`, naming the rule that is broken.
pub fn check_endpoint(url: &str) -> Result<(), EngineError> {
    let lower = url.to_ascii_lowercase();
    let Some(rest) = lower.strip_prefix("http://").or_else(|| lower.strip_prefix("https://"))
    else {
        return Err(usage(format!(
            "s3 endpoint {:?} must start with http:// or https://",
            shown_endpoint(url)
        )));
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let bad = |rule: &str| {
        usage(format!(
            "s3 endpoint {:?} {rule}: give http(s)://HOST[:PORT] only",
            shown_endpoint(url)
        ))
    };
    if authority.contains('@') {
        return Err(bad("must not carry credentials"));
    }
    if !(tail.is_empty() || tail == "/") {
        return Err(bad("has a path, query or fragment"));
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, after)) => (host, after.strip_prefix(':').map(Some).unwrap_or(None)),
            None => return Err(bad("has an unclosed '['")),
        },
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    let host_ok = !host.is_empty()
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:%".contains(&b))
        && !host.starts_with(['.', '-']);
    if !host_ok {
        return Err(bad("has no valid host"));
    }
    if let Some(port) = port {
        match port.parse::<u32>() {
            Ok(1..=65535) => {}
            _ => return Err(bad("has a port outside 1-65535")),
        }
    }
    Ok(())
}

/// `url` with anything before an `@` in its authority replaced, for messages.
fn shown_endpoint(url: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |at| at + 3);
    let authority_end =
        url[scheme_end..].find(['/', '?', '#']).map_or(url.len(), |at| at + scheme_end);
    match url[scheme_end..authority_end].rfind('@') {
        Some(at) => format!(
            "{}{}@{}",
            &url[..scheme_end],
            super::secrets::REDACTED,
            &url[scheme_end + at + 1..]
        ),
        None => url.to_owned(),
    }
}

/// What is at a local repository path, looked at without creating anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalState {
    /// Nothing: the directory does not exist.
    Missing,
    /// A directory holding a repository config.
    Repository,
    /// An empty directory (`lost+found` aside, as on a fresh file system).
    Empty,
    /// A directory holding other things.
    Other,
}

/// Looks at the directory of a local repository.
///
/// # Errors
/// `Usage` when the path is not a directory; `Device`-free: an unreadable path is `Usage` too,
/// naming the cause.
pub fn local_directory(path: &Path) -> Result<LocalState, EngineError> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(LocalState::Missing),
        Err(error) => Err(usage(format!("repository directory {shown}: {error}"))),
        Ok(metadata) if !metadata.is_dir() => Err(usage(format!(
            "repository {shown} is not a directory (a local repository is a directory; an S3 \
             one is s3://BUCKET/PREFIX)"
        ))),
        Ok(_) => {
            if path.join(crate::native::layout::CONFIG_KEY).exists() {
                return Ok(LocalState::Repository);
            }
            let entries = std::fs::read_dir(path)
                .map_err(|error| usage(format!("repository directory {shown}: {error}")))?;
            let other = entries.flatten().any(|entry| entry.file_name() != "lost+found");
            Ok(if other { LocalState::Other } else { LocalState::Empty })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_arguments() {
        let s3 = |bucket: &str, prefix: &str| Location::S3 {
            bucket: bucket.into(),
            prefix: prefix.into(),
        };
        assert_eq!(parse("s3://bkt/pfx/").unwrap(), s3("bkt", "pfx"));
        assert_eq!(parse("s3://my.bucket-1").unwrap(), s3("my.bucket-1", ""));
        assert_eq!(parse("file:///tmp/r").unwrap(), Location::Local("/tmp/r".into()));
        assert_eq!(parse("./s3:/x").unwrap(), Location::Local("./s3:/x".into()));
        for bad in [
            "s3:/bkt/pfx",
            "s3:bkt",
            "S3://bkt",
            "s3://",
            "s3:///pfx",
            "s3://Bkt",
            "s3://ab",
            "s3://bkt_1",
            "s3://-bkt",
            "s3://bkt-",
            "s3://a..b",
            "s3://192.168.1.1",
            "s3://bkt/a//b",
            "s3://bkt/../x",
            "gs://bkt",
            "",
            "file://",
        ] {
            assert_eq!(parse(bad).unwrap_err().kind, ErrorKind::Usage, "{bad}");
        }
        assert!(check_bucket(&"a".repeat(63)).is_ok());
        assert!(check_bucket(&"a".repeat(64)).is_err());
    }

    #[test]
    fn endpoints() {
        for good in [
            "http://127.0.0.1:3900",
            "https://s3.example.net",
            "https://s3.example.net/",
            "http://[::1]:3900",
            "http://localhost:65535",
        ] {
            assert!(check_endpoint(good).is_ok(), "{good}");
        }
        for bad in [
            "127.0.0.1:3900",
            "ftp://h",
            "http://",
            "http://h:99999",
            "http://h:0",
            "http://h:",
            "http://h:x",
            "http://h/path",
            "http://h?x=1",
            "http://h#f",
            "http://[::1",
            "http://-h",
            "http://h h",
        ] {
            assert_eq!(check_endpoint(bad).unwrap_err().kind, ErrorKind::Usage, "{bad}");
        }
        let message = check_endpoint("http://user:pa55word@h:1").unwrap_err().message;
        assert!(!message.contains("pa55word") && message.contains("credentials"), "{message}");
    }
}
