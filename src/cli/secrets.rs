//! Keeps secrets out of every message ferry prints. Secrets are registered where they enter (the
//! config file as text, before any parser sees it; the AWS environment; secret and token files),
//! and `scrub` replaces each registered secret in a message with `<redacted>`. `Output` scrubs
//! every warning and error, so a parser, the SDK or a future caller that echoes a value cannot
//! leak one.
//!
//! Config-file parse errors are also rebuilt here: the parser's own rendering quotes the offending
//! line, and on a line that holds a secret (a key naming a secret, token or password) only the
//! line number and the key name are shown, never the value.
//!
//! This module does not decide what is a credential for a store; it only recognises one by its
//! key name.

use std::sync::Mutex;

/// Registered secrets, longest first (so a secret that contains another is replaced whole).
static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Shorter values are not registered: replacing every `true` or `2024` in a message would garble
/// it and protect nothing (S3 secret keys and API tokens are tens of characters). A short secret
/// on a config line is still never quoted in a parse error (`config_parse_error`).
const SECRET_LENGTH_MIN: usize = 8;

/// What replaces a secret in messages.
pub const REDACTED: &str = "<redacted>";

/// Registers `secret` (trimmed) so that `scrub` removes it from messages.
pub fn register(secret: &str) {
    let secret = secret.trim();
    if secret.len() < SECRET_LENGTH_MIN {
        return;
    }
    let mut secrets = SECRETS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !secrets.iter().any(|known| known == secret) {
        secrets.push(secret.to_owned());
        secrets.sort_by_key(|known| std::cmp::Reverse(known.len()));
    }
}

/// Registers the value of each environment variable in `names` that is set.
pub fn register_env(names: &[&str]) {
    for name in names {
        if let Ok(value) = std::env::var(name) {
            register(&value);
        }
    }
}

/// `text` with every registered secret replaced by `<redacted>`.
pub fn scrub(text: &str) -> String {
    let secrets = SECRETS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut scrubbed = text.to_owned();
    for secret in secrets.iter() {
        if scrubbed.contains(secret.as_str()) {
            scrubbed = scrubbed.replace(secret.as_str(), REDACTED);
        }
    }
    scrubbed
}

/// Whether a config key names a secret value (not a file or variable that holds one).
pub fn is_secret_key(key: &str) -> bool {
    let key = key.trim().trim_matches(['"', '\'']).to_ascii_lowercase();
    let named = ["secret", "token", "password", "passwd", "credential", "private"]
        .iter()
        .any(|word| key.contains(word));
    named && !key.ends_with("_file") && !key.ends_with("_env")
}

/// Whether a config-file line may hold a secret: its key names one. A line without `=` counts
/// when it mentions one (a mangled assignment still carries its value).
fn line_holds_secret(line: &str) -> bool {
    if line.trim_start().starts_with('#') {
        return false;
    }
    let key = line.split(['=', ':']).next().unwrap_or(line);
    is_secret_key(key) || (!line.contains('=') && is_secret_key(line))
}

/// The key of a `key = value` line, when it looks like one (for messages).
fn line_key(line: &str) -> Option<&str> {
    let key = line.split(['=', ':', ' ', '\t']).find(|word| !word.is_empty())?;
    let plausible = key.len() <= 64
        && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    plausible.then_some(key)
}

/// Registers every value on a config-file line that may hold a secret, before the file is
/// parsed: whatever the parser later says about it, the value is known and scrubbed.
pub fn register_config_text(text: &str) {
    for line in text.lines().filter(|line| line_holds_secret(line)) {
        let value = match line.split_once(['=', ':']) {
            Some((_, value)) => value,
            None => line.trim_start().split_once(char::is_whitespace).map_or("", |(_, v)| v),
        };
        let value = value.trim();
        // A quoted value ends at its closing quote (a comment may follow); an unquoted or
        // unterminated one runs to a `#` or the end of the line.
        let quoted = value.strip_prefix(['"', '\'']).and_then(|rest| {
            let quote = value.chars().next()?;
            rest.split_once(quote).map(|(inside, _)| inside)
        });
        let unquoted = value.split('#').next().unwrap_or(value).trim();
        register(quoted.unwrap_or(unquoted.trim_start_matches(['"', '\''])));
    }
}

/// The message for a config file that does not parse: the parser's description and the line,
/// without the parser's quotation of the line; on a line that may hold a secret, only the key.
pub fn config_parse_error(path: &std::path::Path, text: &str, error: &toml::de::Error) -> String {
    let shown = path.display();
    let Some(span) = error.span() else {
        return scrub(&format!("config file {shown}: {}", error.message().trim()));
    };
    let start = span.start.min(text.len());
    let line_number = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_number - 1).unwrap_or("");
    if line_holds_secret(line) {
        let key = line_key(line).map_or(String::new(), |key| format!(" `{key}`"));
        let what = if error.message().starts_with("unknown field") {
            "unknown key"
        } else {
            "invalid entry"
        };
        return format!(
            "config file {shown}, line {line_number}: {what}{key} (the line may hold a secret, \
             so its value is not shown)"
        );
    }
    scrub(&format!("config file {shown}, line {line_number}: {}", error.message().trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_error(text: &str) -> String {
        register_config_text(text);
        let error = toml::from_str::<crate::cli::config::ConfigFile>(text).unwrap_err();
        config_parse_error(std::path::Path::new("f.toml"), text, &error)
    }

    #[test]
    fn parse_errors_never_show_a_secret() {
        for (text, secret) in [
            ("[s3]\nsecret_access_key = wJalrXUtnFEMIK7MDENG\n", "wJalrXUtnFEMIK7MDENG"),
            ("[s3]\nsecret_access_key = \"wJalrXUtnFEMIK7MDENH\n", "wJalrXUtnFEMIK7MDENH"),
            ("[s3]\nsecret_access_key = 83920174\n", "83920174"),
            ("[s3]\nsecret_acess_key = \"wJalrXUtnFEMIK7MDENJ\"\n", "wJalrXUtnFEMIK7MDENJ"),
            ("[s3]\nsecret_access_key \"wJalrXUtnFEMIK7MDENK\"\n", "wJalrXUtnFEMIK7MDENK"),
            ("[cinder]\nbackup_s3_store_secret_key = 1234567\n", "1234567"),
            ("[lightbits]\ntoken = \"eyJhbGciOi.eyJzdWIi.sig\"\n", "eyJhbGciOi.eyJzdWIi.sig"),
        ] {
            let message = parse_error(text);
            assert!(!message.contains(secret), "{message}");
            assert!(message.contains("line 2"), "{message}");
        }
        let message = parse_error("[s3]\nregoin = \"x\"\n");
        assert!(message.contains("regoin") && message.contains("line 2"), "{message}");
    }

    #[test]
    fn comments_and_short_values_are_not_registered() {
        register_config_text("# the secret_access_key comes from vault-kv-store\n");
        register_config_text("secret_access_key = \"quoted-secret-1\" # from vault-kv-other\n");
        assert_eq!(scrub("vault-kv-store vault-kv-other"), "vault-kv-store vault-kv-other");
        assert_eq!(scrub("quoted-secret-1"), REDACTED);
    }

    #[test]
    fn scrub_replaces_registered_secrets() {
        register("s3cr3t-value-for-scrub");
        register("ab");
        assert_eq!(scrub("key s3cr3t-value-for-scrub refused"), "key <redacted> refused");
        assert_eq!(scrub("ab"), "ab");
        assert!(is_secret_key("secret_access_key") && !is_secret_key("secret_access_key_file"));
        assert!(is_secret_key("backup_s3_store_secret_key") && !is_secret_key("token_env"));
        assert!(!is_secret_key("secret_access_key_file ") && is_secret_key(" \"token\" "));
    }
}
