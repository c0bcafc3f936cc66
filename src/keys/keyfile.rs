//! Key files: the SSE-C customer key and the `cse-local` master key, 256 bits each.
//!
//! # Where a key file comes from
//! A spec is either a path, or `cred:NAME`, meaning `$CREDENTIALS_DIRECTORY/NAME`: the directory systemd fills
//! from `LoadCredential=` / `SetCredentialEncrypted=` for a service. `cred:` without `CREDENTIALS_DIRECTORY` set
//! is an error (the mount is not running under systemd with credentials).
//!
//! # Permissions
//! A key file readable or writable by group or others (`mode & 0o077 != 0`) is refused: run `chmod 600 FILE`.
//! Files inside `$CREDENTIALS_DIRECTORY` are exempt from the group check, because systemd owns that directory
//! and sets its modes itself (the directory is private to the service), but they must still not be readable or
//! writable by others (`mode & 0o007 == 0`).
//!
//! # Accepted encodings
//! - exactly 32 raw bytes (what `s3crypt keygen` writes);
//! - 64 hexadecimal characters (upper or lower case);
//! - standard base64 (with padding, 44 characters) of 32 bytes.
//!
//! Whitespace and newlines around the text forms are ignored. Anything else is refused with a message that lists
//! these encodings; an error never contains any part of the file's content.
//!
//! # Several SSE-C keys in one file
//! An SSE-C key file may hold several keys, one per line, as s3fs's does during a key rotation: the first is the
//! current key (every write uses it), the others are older keys still accepted for reading. A line is a key in
//! hex or base64, or 32 characters taken as the key itself (s3fs's raw form); empty lines and lines starting
//! with `#` are skipped. A file of exactly 32 bytes is always one raw key.
use super::KeyError;
use crate::format::KEY_LEN;
use rand::RngCore;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The environment variable systemd sets to the service's credentials directory.
pub const CREDENTIALS_DIRECTORY_VAR: &str = "CREDENTIALS_DIRECTORY";
/// Prefix of a key-file spec that names a systemd credential.
pub const CRED_PREFIX: &str = "cred:";

/// Longest key file read: the text forms with generous whitespace fit easily; anything bigger is not a key.
const MAX_KEY_FILE_LEN: u64 = 4096;
const ENCODINGS: &str = "expected 32 raw bytes, 64 hex characters, or base64 of 32 bytes";

/// Reads a 256-bit key from a key file named by `spec` (a path or `cred:NAME`).
pub fn read_key_file(spec: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
    let (path, in_credentials_dir) = resolve(spec)?;
    let shown = path.display().to_string();
    let content = read_checked(&path, &shown, in_credentials_dir)?;
    decode_key(&content).ok_or_else(|| KeyError::KeyFile {
        path: shown,
        reason: format!("not a 256-bit key: {ENCODINGS}"),
    })
}

/// Reads the keys of an SSE-C key file (see the module doc): the current key first, then older ones.
pub fn read_key_list(spec: &str) -> Result<Vec<Zeroizing<[u8; KEY_LEN]>>, KeyError> {
    let (path, in_credentials_dir) = resolve(spec)?;
    let shown = path.display().to_string();
    let content = read_checked(&path, &shown, in_credentials_dir)?;
    decode_key_list(&content).map_err(|reason| KeyError::KeyFile { path: shown, reason })
}

/// Decodes one key, or one key per line; the error names the line (never its content).
pub(crate) fn decode_key_list(content: &[u8]) -> Result<Vec<Zeroizing<[u8; KEY_LEN]>>, String> {
    if let Some(key) = decode_key(content) {
        return Ok(vec![key]);
    }
    let mut keys = Vec::new();
    for (n, line) in content.split(|&b| b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        let key = match line.len() {
            KEY_LEN => {
                let mut key = Zeroizing::new([0u8; KEY_LEN]);
                key.copy_from_slice(line);
                key
            }
            _ => decode_key(line)
                .ok_or_else(|| format!("line {} is not a 256-bit key: {ENCODINGS}, one key per line", n + 1))?,
        };
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(format!("no key in the file: {ENCODINGS}"));
    }
    Ok(keys)
}

/// Writes a fresh random 256-bit key (32 raw bytes, mode 0600) to `path`. Refuses to overwrite an existing file,
/// so a key in use cannot be destroyed by mistake.
pub fn keygen(path: &Path) -> Result<(), KeyError> {
    let shown = path.display().to_string();
    let err = |reason: String| KeyError::KeyFile {
        path: shown.clone(),
        reason,
    };
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    rand::rngs::OsRng.fill_bytes(&mut key[..]);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                err("already exists; refusing to overwrite a key file (remove it first if it is really unused)".into())
            } else {
                err(io_reason(&e))
            }
        })?;
    file.write_all(&key[..]).map_err(|e| err(io_reason(&e)))?;
    file.sync_all().map_err(|e| err(io_reason(&e)))?;
    // Make the new directory entry durable too.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// A key file's content, once its type, permissions and size are checked.
fn read_checked(path: &Path, shown: &str, in_credentials_dir: bool) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let meta = fs::metadata(path).map_err(|e| KeyError::KeyFile {
        path: shown.to_string(),
        reason: io_reason(&e),
    })?;
    if !meta.is_file() {
        return Err(KeyError::KeyFile {
            path: shown.to_string(),
            reason: "not a regular file".into(),
        });
    }
    check_mode(shown, meta.mode() & 0o7777, in_credentials_dir)?;
    if meta.len() > MAX_KEY_FILE_LEN {
        return Err(KeyError::KeyFile {
            path: shown.to_string(),
            reason: format!("{} bytes is too large for a key file: {ENCODINGS}", meta.len()),
        });
    }
    Ok(Zeroizing::new(fs::read(path).map_err(|e| KeyError::KeyFile {
        path: shown.to_string(),
        reason: io_reason(&e),
    })?))
}

/// Resolves a spec to a path, and says whether it lies in the systemd credentials directory.
fn resolve(spec: &str) -> Result<(PathBuf, bool), KeyError> {
    let creds_dir = std::env::var_os(CREDENTIALS_DIRECTORY_VAR).map(PathBuf::from);
    if let Some(name) = spec.strip_prefix(CRED_PREFIX) {
        let dir = creds_dir.ok_or_else(|| KeyError::KeyFile {
            path: spec.to_string(),
            reason: format!(
                "{CRED_PREFIX}NAME needs ${CREDENTIALS_DIRECTORY_VAR}, which is not set (it is set by systemd for a \
                 service with LoadCredential=)"
            ),
        })?;
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(KeyError::KeyFile {
                path: spec.to_string(),
                reason: "a credential name must be a plain file name".into(),
            });
        }
        return Ok((dir.join(name), true));
    }
    let path = PathBuf::from(spec);
    let inside = match (creds_dir.and_then(|d| d.canonicalize().ok()), path.canonicalize().ok()) {
        (Some(dir), Some(p)) => p.starts_with(dir),
        _ => false,
    };
    Ok((path, inside))
}

fn check_mode(path: &str, mode: u32, in_credentials_dir: bool) -> Result<(), KeyError> {
    let forbidden = if in_credentials_dir { 0o007 } else { 0o077 };
    if mode & forbidden != 0 {
        return Err(KeyError::KeyFilePermissions {
            path: path.to_string(),
            mode,
        });
    }
    Ok(())
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied (cannot read it as this user)".into(),
        _ => e.to_string(),
    }
}

/// Decodes a key file's content in one of the accepted encodings; `None` if it is none of them.
pub(crate) fn decode_key(content: &[u8]) -> Option<Zeroizing<[u8; KEY_LEN]>> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if content.len() == KEY_LEN {
        key.copy_from_slice(content);
        return Some(key);
    }
    let text = content.trim_ascii();
    if text.len() == 2 * KEY_LEN && text.iter().all(u8::is_ascii_hexdigit) {
        hex::decode_to_slice(text, &mut key[..]).ok()?;
        return Some(key);
    }
    use base64::Engine;
    let decoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(text).ok()?);
    if decoded.len() != KEY_LEN {
        return None;
    }
    key.copy_from_slice(&decoded);
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_encoding() {
        let raw = [7u8; 32];
        assert_eq!(*decode_key(&raw).unwrap(), raw);
        let hexed = format!("  {}\n", hex::encode(raw));
        assert_eq!(*decode_key(hexed.as_bytes()).unwrap(), raw);
        let upper = hex::encode_upper(raw);
        assert_eq!(*decode_key(upper.as_bytes()).unwrap(), raw);
        use base64::Engine;
        let b64 = format!("{}\n", base64::engine::general_purpose::STANDARD.encode(raw));
        assert_eq!(*decode_key(b64.as_bytes()).unwrap(), raw);
    }

    #[test]
    fn a_key_list_is_one_key_per_line_current_first() {
        use base64::Engine;
        let (a, b, c) = ([1u8; 32], [2u8; 32], [b'k'; 32]);
        let text = format!(
            "# rotated 2026-12\n{}\n\n  {}  \n{}\n",
            hex::encode(a),
            base64::engine::general_purpose::STANDARD.encode(b),
            String::from_utf8(c.to_vec()).unwrap()
        );
        let keys = decode_key_list(text.as_bytes()).unwrap();
        let got: Vec<[u8; 32]> = keys.iter().map(|k| **k).collect();
        assert_eq!(got, vec![a, b, c]);
        // One key alone, in any encoding, is a list of one; 32 raw bytes are one key even with a newline inside.
        let mut raw = [3u8; 32];
        raw[5] = b'\n';
        assert_eq!(*decode_key_list(&raw).unwrap()[0], raw);
        // A bad line is named by number, never shown.
        let bad = format!("{}\nsecret-looking-text\n", hex::encode(a));
        let err = decode_key_list(bad.as_bytes()).unwrap_err();
        assert!(err.contains("line 2") && !err.contains("secret"), "{err}");
        assert!(decode_key_list(b"# only a comment\n").is_err());
    }

    #[test]
    fn refuses_wrong_lengths() {
        assert!(decode_key(&[1u8; 31]).is_none());
        assert!(decode_key(&[1u8; 33]).is_none());
        assert!(decode_key(hex::encode([1u8; 31]).as_bytes()).is_none());
        use base64::Engine;
        assert!(decode_key(base64::engine::general_purpose::STANDARD.encode([1u8; 16]).as_bytes()).is_none());
        assert!(decode_key(b"").is_none());
    }

    #[test]
    fn mode_check() {
        assert!(check_mode("f", 0o600, false).is_ok());
        assert!(check_mode("f", 0o400, false).is_ok());
        assert!(matches!(
            check_mode("f", 0o640, false),
            Err(KeyError::KeyFilePermissions { .. })
        ));
        assert!(matches!(
            check_mode("f", 0o604, false),
            Err(KeyError::KeyFilePermissions { .. })
        ));
        assert!(check_mode("f", 0o640, true).is_ok());
        assert!(matches!(
            check_mode("f", 0o644, true),
            Err(KeyError::KeyFilePermissions { .. })
        ));
    }
}
