//! Secrets: resolving secret names to values, and masking the values in output.
//!
//! A job lists the *names* of the secrets it needs (`JobSpec::secrets`); at run time a
//! [`SecretSource`] resolves them, from the environment or from a secrets file, into
//! [`ResolvedSecrets`]. Their values go to the steps' environment and into a
//! [`Masker`], which replaces every byte of every occurrence of a value in the job's
//! output with `*`, also across the chunk boundaries of a stream ([`StreamMasker`]).
//!
//! Nothing here prints a secret value: `Debug` shows names and counts only, and
//! errors about a malformed secrets file give the line number, never its text.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

/// The byte every byte of a secret is replaced with. Masking keeps lengths, so a
/// step's stored output has the same byte offsets as what the step wrote, and an
/// output stream resumed after an engine restart lines up exactly. The price is
/// that a secret's length is visible.
pub const MASK_BYTE: u8 = b'*';

/// The prefix `reel` looks for first when it reads secrets from the environment:
/// secret `TOKEN` comes from `REEL_SECRET_TOKEN`, else from `TOKEN`.
pub const DEFAULT_ENV_PREFIX: &str = "REEL_SECRET_";

/// Whether `name` is a valid secret name: ASCII letters, digits and `_`, not
/// starting with a digit (so that it is a portable environment variable name).
pub fn is_valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Why secrets could not be loaded or resolved.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The secrets file could not be read.
    #[error("{path}: cannot read secrets file: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The secrets file is readable or writable by other users.
    #[error(
        "{path}: refusing to use a secrets file that is {access} by group or others (mode {mode:04o}); run \"chmod 600 {path}\""
    )]
    Permissions {
        /// The file.
        path: String,
        /// `readable`, `writable` or `readable and writable`.
        access: &'static str,
        /// Its permission bits.
        mode: u32,
    },
    /// A line of the secrets file is not `NAME=value`, a comment or blank.
    #[error("{path}:{line}: {message}")]
    Malformed {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong (never the line's text, which may hold a secret).
        message: String,
    },
    /// Secrets the job needs are not set.
    #[error("{}", missing_message(.names, .looked_in))]
    Missing {
        /// The names not found, in the order asked.
        names: Vec<String>,
        /// Where they were looked for.
        looked_in: String,
    },
    /// A secret's environment variable is set but is not valid UTF-8.
    #[error("secret \"{name}\": environment variable {var} is not valid UTF-8")]
    NotUnicode {
        /// The secret.
        name: String,
        /// The variable that holds it.
        var: String,
    },
    /// A secret name asked for is not a valid name.
    #[error(
        "invalid secret name \"{name}\": use letters, digits and \"_\", not starting with a digit"
    )]
    InvalidName {
        /// The name.
        name: String,
    },
}

fn missing_message(names: &[String], looked_in: &str) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    if quoted.len() == 1 {
        format!("secret {} is not set (looked in {looked_in})", quoted[0])
    } else {
        format!(
            "secrets {} are not set (looked in {looked_in})",
            quoted.join(", ")
        )
    }
}

/// Where secret values come from: the environment, or a secrets file.
///
/// The two are exclusive: with a secrets file (`--secrets-file`), secrets come from
/// it only, so that what a job sees does not depend on the caller's environment.
pub struct SecretSource {
    kind: SourceKind,
}

enum SourceKind {
    /// Environment variables; `vars: None` reads the process environment.
    Env {
        prefix: Option<String>,
        vars: Option<BTreeMap<OsString, OsString>>,
    },
    /// Values read from a secrets file.
    File {
        path: String,
        values: BTreeMap<String, String>,
    },
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            SourceKind::Env { prefix, vars } => f
                .debug_struct("SecretSource::Env")
                .field("prefix", prefix)
                .field("process_environment", &vars.is_none())
                .finish(),
            SourceKind::File { path, values } => f
                .debug_struct("SecretSource::File")
                .field("path", path)
                .field("names", &values.keys().collect::<Vec<_>>())
                .finish(),
        }
    }
}

impl SecretSource {
    /// Secrets from the process environment: secret `NAME` is the variable
    /// `<prefix>NAME` if set, else `NAME` (with no prefix, just `NAME`).
    pub fn from_env(prefix: Option<&str>) -> Self {
        SecretSource {
            kind: SourceKind::Env {
                prefix: prefix.map(str::to_string),
                vars: None,
            },
        }
    }

    /// Like [`from_env`](Self::from_env), over the given variables instead of the
    /// process environment (for tests and embedding).
    pub fn from_env_vars<I, K, V>(prefix: Option<&str>, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        SecretSource {
            kind: SourceKind::Env {
                prefix: prefix.map(str::to_string),
                vars: Some(
                    vars.into_iter()
                        .map(|(k, v)| (k.into(), v.into()))
                        .collect(),
                ),
            },
        }
    }

    /// Secrets from a file of `NAME=value` lines (see
    /// [`from_file_contents`](Self::from_file_contents)). On Unix the file must not be
    /// readable or writable by group or others: a secret that other users can read
    /// is no longer one.
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let shown = path.display().to_string();
        let read_error = |source| SecretError::Read {
            path: shown.clone(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(read_error)?;
        // Check the file that was opened, not the path again (no race).
        let metadata = file.metadata().map_err(read_error)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = metadata.permissions().mode() & 0o7777;
            let access = match (mode & 0o044 != 0, mode & 0o022 != 0) {
                (true, true) => Some("readable and writable"),
                (true, false) => Some("readable"),
                (false, true) => Some("writable"),
                (false, false) => None,
            };
            if let Some(access) = access {
                return Err(SecretError::Permissions {
                    path: shown,
                    access,
                    mode,
                });
            }
        }
        #[cfg(not(unix))]
        let _ = metadata;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(read_error)?;
        Self::from_file_contents(&bytes, &shown)
    }

    /// Secrets from the contents of a secrets file, named `path` in errors.
    ///
    /// Each line is `NAME=value`, a comment (first non-blank character `#`) or blank.
    /// The value is everything after the first `=`, verbatim: no quotes are removed
    /// and no spaces trimmed (a trailing `\r` of a CRLF file is dropped). A name may
    /// appear only once. Errors give the line number, never the line.
    pub fn from_file_contents(contents: &[u8], path: &str) -> Result<Self, SecretError> {
        let mut values = BTreeMap::new();
        let mut first_line: BTreeMap<String, usize> = BTreeMap::new();
        for (i, raw) in contents.split(|&b| b == b'\n').enumerate() {
            let line_no = i + 1;
            let malformed = |message: &str| SecretError::Malformed {
                path: path.to_string(),
                line: line_no,
                message: message.to_string(),
            };
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let line = std::str::from_utf8(raw).map_err(|_| malformed("not valid UTF-8"))?;
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let Some((name, value)) = line.split_once('=') else {
                return Err(malformed(
                    "expected NAME=value, a # comment or a blank line",
                ));
            };
            if !is_valid_name(name) {
                return Err(malformed(
                    "invalid name before \"=\": use letters, digits and \"_\", not starting with a digit",
                ));
            }
            if let Some(first) = first_line.get(name) {
                return Err(malformed(&format!(
                    "secret \"{name}\" is already defined on line {first}"
                )));
            }
            first_line.insert(name.to_string(), line_no);
            values.insert(name.to_string(), value.to_string());
        }
        Ok(SecretSource {
            kind: SourceKind::File {
                path: path.to_string(),
                values,
            },
        })
    }

    /// Resolves every name, or fails naming all those that are missing.
    pub fn resolve<S: AsRef<str>>(&self, names: &[S]) -> Result<ResolvedSecrets, SecretError> {
        let mut values = BTreeMap::new();
        let mut missing = Vec::new();
        for name in names {
            let name = name.as_ref();
            if !is_valid_name(name) {
                return Err(SecretError::InvalidName {
                    name: name.to_string(),
                });
            }
            match self.lookup(name)? {
                Some(value) => {
                    values.insert(name.to_string(), value);
                }
                None => {
                    if !missing.iter().any(|m| m == name) {
                        missing.push(name.to_string());
                    }
                }
            }
        }
        if missing.is_empty() {
            Ok(ResolvedSecrets { values })
        } else {
            Err(SecretError::Missing {
                names: missing,
                looked_in: self.looked_in(),
            })
        }
    }

    fn lookup(&self, name: &str) -> Result<Option<String>, SecretError> {
        match &self.kind {
            SourceKind::File { values, .. } => Ok(values.get(name).cloned()),
            SourceKind::Env { prefix, vars } => {
                let candidates = prefix
                    .iter()
                    .map(|p| format!("{p}{name}"))
                    .chain(std::iter::once(name.to_string()));
                for var in candidates {
                    let value = match vars {
                        Some(vars) => vars.get(std::ffi::OsStr::new(&var)).cloned(),
                        None => std::env::var_os(&var),
                    };
                    if let Some(value) = value {
                        return value.into_string().map(Some).map_err(|_| {
                            SecretError::NotUnicode {
                                name: name.to_string(),
                                var,
                            }
                        });
                    }
                }
                Ok(None)
            }
        }
    }

    fn looked_in(&self) -> String {
        match &self.kind {
            SourceKind::File { path, .. } => format!("secrets file {path}"),
            SourceKind::Env {
                prefix: Some(prefix),
                ..
            } => format!("environment variables {prefix}<NAME>, then <NAME>"),
            SourceKind::Env { prefix: None, .. } => {
                "environment variables of the same name".to_string()
            }
        }
    }
}

/// Secret values by name, as resolved for one job.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ResolvedSecrets {
    values: BTreeMap<String, String>,
}

impl fmt::Debug for ResolvedSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedSecrets")
            .field("names", &self.values.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ResolvedSecrets {
    /// The value of secret `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// `(name, value)` pairs, by name: what to add to a step's environment.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many secrets there are.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// A masker for these values.
    pub fn masker(&self) -> Masker {
        Masker::new(self.values.values())
    }
}

/// Replaces every byte of every occurrence of any secret value in output with
/// [`MASK_BYTE`], keeping lengths.
///
/// Matching is on bytes, so output that is not UTF-8 is masked too and passes
/// through otherwise unchanged. Every byte that belongs to an occurrence of some
/// secret is hidden, also where occurrences overlap (secrets `abc` and `bcd` in
/// `abcd` give `****`).
///
/// Empty values are ignored (they occur everywhere and hide nothing). Values of one
/// or two bytes are still masked, although they over-mask (a secret `1` turns every
/// `1` in the log into `*`): the alternative, printing a secret in the clear
/// because it is short, is a leak, while over-masking is visible, harmless, and a
/// hint that the secret is weak.
///
/// Cloning is cheap (the patterns are shared).
#[derive(Clone)]
pub struct Masker {
    inner: Arc<Patterns>,
}

struct Patterns {
    /// Secret values by first byte, longest first.
    by_first_byte: Vec<Vec<Box<[u8]>>>,
    count: usize,
    max_len: usize,
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Masker")
            .field("secrets", &self.inner.count)
            .field("max_secret_len", &self.inner.max_len)
            .finish()
    }
}

impl Masker {
    /// A masker for these values (empty values are ignored, duplicates merged).
    pub fn new<I, S>(values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut by_first_byte: Vec<Vec<Box<[u8]>>> = vec![Vec::new(); 256];
        let mut count = 0;
        let mut max_len = 0;
        for value in values {
            let value = value.as_ref();
            let Some(&first) = value.first() else {
                continue;
            };
            let bucket = &mut by_first_byte[usize::from(first)];
            if bucket.iter().any(|v| &**v == value) {
                continue;
            }
            bucket.push(value.into());
            count += 1;
            max_len = max_len.max(value.len());
        }
        for bucket in &mut by_first_byte {
            bucket.sort_by_key(|v| std::cmp::Reverse(v.len()));
        }
        Masker {
            inner: Arc::new(Patterns {
                by_first_byte,
                count,
                max_len,
            }),
        }
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.inner.count == 0
    }

    /// The length in bytes of the longest secret value (0 with none).
    pub fn max_secret_len(&self) -> usize {
        self.inner.max_len
    }

    /// Masks a complete buffer.
    pub fn mask(&self, input: &[u8]) -> Vec<u8> {
        let mut stream = self.stream();
        let mut out = stream.push(input);
        out.extend(stream.finish());
        out
    }

    /// A streaming masker for one output stream.
    pub fn stream(&self) -> StreamMasker {
        StreamMasker::new(self.clone())
    }
}

impl Patterns {
    /// The length of the longest secret that `data` starts with.
    fn longest_match(&self, data: &[u8]) -> Option<usize> {
        let first = *data.first()?;
        self.by_first_byte[usize::from(first)]
            .iter()
            .find(|v| data.starts_with(v))
            .map(|v| v.len())
    }
}

/// Masks a stream of chunks, such as a step's stdout, where a secret may straddle
/// chunk boundaries.
///
/// [`push`](Self::push) returns the masked output that is final so far and holds
/// back only a real partial match: the tail from the first position where the rest
/// is a proper prefix of some secret (at most `max_secret_len - 1` bytes, none when
/// the tail cannot begin a secret); [`finish`](Self::finish) returns the rest at the
/// end of the stream. The concatenated output is the same however the input is split, and the
/// same as [`Masker::mask`] on the whole input. After `finish` the masker is ready
/// for a new stream.
#[derive(Debug)]
pub struct StreamMasker {
    masker: Masker,
    /// Input not yet decided on; `pending[0]` is at stream offset `offset`.
    pending: Vec<u8>,
    offset: u64,
    /// Stream offset up to which input is hidden by the current mask run.
    mask_end: u64,
    /// The stream resumes right after a masked secret (see `resume_inside_secret`).
    resumed_inside: bool,
}

impl StreamMasker {
    /// A streaming masker with `masker`'s secrets.
    pub fn new(masker: Masker) -> Self {
        StreamMasker {
            masker,
            pending: Vec::new(),
            offset: 0,
            mask_end: 0,
            resumed_inside: false,
        }
    }

    /// Feeds a chunk; returns the output that can be released.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<u8> {
        let max_len = self.masker.max_secret_len();
        if max_len == 0 {
            return bytes.to_vec();
        }
        self.pending.extend_from_slice(bytes);
        if self.resumed_inside {
            if self.pending.len() + 1 < max_len {
                // Not enough yet to tell how much of a cut secret comes first.
                return Vec::new();
            }
            self.mask_resumed_prefix();
        }
        // A position is decided unless what follows it could still grow into a
        // secret: only a real partial match at the tail is held back.
        let ready = self.first_partial_match();
        self.release(ready)
    }

    /// The first pending position from which the rest of the pending input is a
    /// proper prefix of some secret (so more input could complete it), or the
    /// pending length if there is none. Only the last `max_secret_len - 1`
    /// positions can be one.
    fn first_partial_match(&self) -> usize {
        let patterns = &*self.masker.inner;
        let len = self.pending.len();
        let from = len.saturating_sub(patterns.max_len.saturating_sub(1));
        (from..len)
            .find(|&i| {
                let tail = &self.pending[i..];
                patterns.by_first_byte[usize::from(tail[0])]
                    .iter()
                    .any(|v| v.len() > tail.len() && v.starts_with(tail))
            })
            .unwrap_or(len)
    }

    /// Hides the longest prefix of pending input that ends some secret.
    fn mask_resumed_prefix(&mut self) {
        self.resumed_inside = false;
        let patterns = &*self.masker.inner;
        let longest = (1..=self.pending.len().min(patterns.max_len.saturating_sub(1)))
            .rev()
            .find(|&k| {
                let prefix = &self.pending[..k];
                patterns
                    .by_first_byte
                    .iter()
                    .flatten()
                    .any(|v| v.len() > k && v.ends_with(prefix))
            });
        if let Some(k) = longest {
            self.mask_end = self.mask_end.max(self.offset + k as u64);
        }
    }

    /// Marks the stream as resuming right after stored output that ended inside
    /// a masked secret: the longest prefix of what comes next that is a proper
    /// suffix of some secret is masked too (over-masking a few bytes at worst).
    pub fn resume_inside_secret(&mut self) {
        self.resumed_inside = true;
    }

    /// How many bytes of input it holds back (they could begin a secret).
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    /// Ends the stream; returns the remaining output.
    pub fn finish(&mut self) -> Vec<u8> {
        if self.resumed_inside {
            self.mask_resumed_prefix();
        }
        let out = self.release(self.pending.len());
        self.offset = 0;
        self.mask_end = 0;
        out
    }

    /// Decides the first `count` pending bytes and returns their output.
    fn release(&mut self, count: usize) -> Vec<u8> {
        let patterns = &*self.masker.inner;
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let position = self.offset + i as u64;
            if let Some(len) = patterns.longest_match(&self.pending[i..]) {
                self.mask_end = self.mask_end.max(position + len as u64);
            }
            out.push(if position < self.mask_end {
                MASK_BYTE
            } else {
                self.pending[i]
            });
        }
        self.pending.drain(..count);
        self.offset += count as u64;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(values: &[&[u8]]) -> Masker {
        Masker::new(values.iter().copied())
    }

    /// Masks `input` fed in chunks cut at `cuts` (sorted positions).
    fn mask_split(m: &Masker, input: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut stream = m.stream();
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            let chunk = stream.push(&input[start..cut]);
            assert!(
                stream.pending.len() < m.max_secret_len().max(1),
                "held back {} bytes",
                stream.pending.len()
            );
            out.extend(chunk);
            start = cut;
        }
        out.extend(stream.finish());
        out
    }

    #[test]
    fn masks_every_occurrence() {
        let m = masker(&[b"hunter2", b"s3cr3t"]);
        assert_eq!(
            m.mask(b"pw=hunter2 and s3cr3t, again hunter2"),
            b"pw=******* and ******, again *******"
        );
        assert_eq!(m.mask(b"nothing here"), b"nothing here");
        assert_eq!(m.mask(b""), b"");
    }

    #[test]
    fn empty_values_are_ignored_and_short_ones_masked() {
        let m = masker(&[b"", b"x"]);
        assert_eq!(m.max_secret_len(), 1);
        assert_eq!(m.mask(b"axbxx"), b"a*b**");
        let none = masker(&[b""]);
        assert!(none.is_empty());
        assert_eq!(none.mask(b"abc"), b"abc");
        let mut s = none.stream();
        assert_eq!(s.push(b"abc"), b"abc");
        assert_eq!(s.finish(), b"");
    }

    #[test]
    fn straddling_a_chunk_boundary() {
        let m = masker(&[b"TOKEN123"]);
        let mut s = m.stream();
        let mut out = s.push(b"echo TOK");
        assert_eq!(out, b"echo ", "holds back only the partial match");
        out.extend(s.push(b"EN1"));
        out.extend(s.push(b"23 done"));
        out.extend(s.finish());
        assert_eq!(out, b"echo ******** done");
    }

    #[test]
    fn a_false_start_is_released() {
        let m = masker(&[b"abcdef"]);
        assert_eq!(
            mask_split(&m, b"abcdeX abcdef", &[3, 5, 9]),
            b"abcdeX ******"
        );
        assert_eq!(mask_split(&m, b"abcde", &[4]), b"abcde");
    }

    #[test]
    fn overlapping_and_nested_secrets() {
        let m = masker(&[b"abc", b"bcd"]);
        assert_eq!(m.mask(b"xabcdx"), b"x****x");
        assert_eq!(m.mask(b"abcabc"), b"******");
        assert_eq!(m.mask(b"abcbcd"), b"******");
        // A secret inside another: the longer one wins, no fragment shows.
        let m = masker(&[b"pass", b"password1"]);
        assert_eq!(m.mask(b"password1 pass passw"), b"********* **** ****w");
        // A secret overlapping itself.
        let m = masker(&[b"aa"]);
        assert_eq!(m.mask(b"aaa"), b"***");
        assert_eq!(m.mask(b"aaaa"), b"****");
    }

    #[test]
    fn invalid_utf8_passes_through_and_is_masked() {
        let secret: &[u8] = b"\xff\xfekey\x80";
        let m = masker(&[secret]);
        let input = b"\xc3\x28 \xff\xfekey\x80 \xe2\x82";
        assert_eq!(m.mask(input), b"\xc3\x28 ****** \xe2\x82");
        let cuts: Vec<usize> = (0..=input.len()).collect();
        assert_eq!(mask_split(&m, input, &cuts), b"\xc3\x28 ****** \xe2\x82");
    }

    #[test]
    fn every_split_gives_the_same_output() {
        let m = masker(&[b"abc", b"bcd", b"cdcdc", b"\xffz", b"q"]);
        let input: &[u8] =
            b"abcd cdcdcdc \xff\xffz abcbcdq xq cdcdabc bc ab \xff abcdcdcdcdc qq end";
        let expected = m.mask(input);
        // Every single cut, every pair of cuts, and byte-by-byte.
        for a in 0..=input.len() {
            assert_eq!(mask_split(&m, input, &[a]), expected, "cut at {a}");
            for b in a..=input.len() {
                assert_eq!(mask_split(&m, input, &[a, b]), expected, "cuts {a}, {b}");
            }
        }
        let all: Vec<usize> = (0..=input.len()).collect();
        assert_eq!(mask_split(&m, input, &all), expected);
    }

    #[test]
    fn random_inputs_split_randomly_agree_with_a_reference() {
        // A small deterministic generator keeps this test free of dependencies.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let alphabet = b"ab\xff";
        for _ in 0..300 {
            let secrets: Vec<Vec<u8>> = (0..1 + next(3))
                .map(|_| {
                    (0..1 + next(4))
                        .map(|_| alphabet[next(3) as usize])
                        .collect()
                })
                .collect();
            let input: Vec<u8> = (0..next(40)).map(|_| alphabet[next(3) as usize]).collect();
            let m = Masker::new(&secrets);
            let expected = reference_mask(&secrets, &input);
            assert_eq!(m.mask(&input), expected, "{secrets:?} {input:?}");
            let mut cuts: Vec<usize> = (0..next(6))
                .map(|_| next(input.len() as u64 + 1) as usize)
                .collect();
            cuts.sort_unstable();
            assert_eq!(mask_split(&m, &input, &cuts), expected);
        }
    }

    /// The definition: hide every byte covered by some occurrence of some secret,
    /// one `***` per maximal run of overlapping occurrences.
    fn reference_mask(secrets: &[Vec<u8>], input: &[u8]) -> Vec<u8> {
        let mut intervals: Vec<(usize, usize)> = Vec::new();
        for s in secrets.iter().filter(|s| !s.is_empty()) {
            for start in 0..input.len() {
                if input[start..].starts_with(s) {
                    intervals.push((start, start + s.len()));
                }
            }
        }
        intervals.sort_unstable();
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (s, e) in intervals {
            match runs.last_mut() {
                Some(last) if s < last.1 => last.1 = last.1.max(e),
                _ => runs.push((s, e)),
            }
        }
        let mut out = Vec::new();
        let mut at = 0;
        for (s, e) in runs {
            out.extend_from_slice(&input[at..s]);
            out.extend(std::iter::repeat_n(MASK_BYTE, e - s));
            at = e;
        }
        out.extend_from_slice(&input[at..]);
        out
    }

    #[test]
    fn a_resumed_stream_masks_the_rest_of_a_secret_cut_by_a_crash() {
        let m = masker(&[b"TOKEN123"]);
        // Stored before the crash: "echo *****" (TOKEN masked); the agent resends
        // from there: "123 done".
        let mut s = m.stream();
        s.resume_inside_secret();
        let mut out = s.push(b"123 done");
        out.extend(s.finish());
        assert_eq!(out, b"*** done");
        // Nothing is masked when the resumed bytes cannot end a secret.
        let mut s = m.stream();
        s.resume_inside_secret();
        let mut out = s.push(b"xyz done");
        out.extend(s.finish());
        assert_eq!(out, b"xyz done");
    }

    #[test]
    fn only_a_real_partial_match_is_held_back() {
        let m = masker(&[b"hunter2-secret"]);
        let mut s = m.stream();
        // Nothing here can begin the secret: all of it is released at once.
        assert_eq!(s.push(b"plain output\n"), b"plain output\n");
        assert_eq!(s.held(), 0);
        // "hun" could: it is held until it is decided.
        assert_eq!(s.push(b"more hun"), b"more ");
        assert_eq!(s.held(), 3);
        assert_eq!(s.push(b"gry\n"), b"hungry\n");
        assert_eq!(s.held(), 0);
        assert_eq!(s.push(b"hunter2-"), b"");
        assert_eq!(s.held(), 8);
        assert_eq!(s.push(b"secret!"), b"**************!");
        assert_eq!(s.finish(), b"");
    }

    #[test]
    fn stream_is_reusable_after_finish() {
        let m = masker(&[b"secret"]);
        let mut s = m.stream();
        let mut out = s.push(b"a secr");
        out.extend(s.finish());
        assert_eq!(out, b"a secr");
        let mut out = s.push(b"secret");
        out.extend(s.finish());
        assert_eq!(out, b"******");
    }

    #[test]
    fn debug_never_shows_values() {
        let m = masker(&[b"hunter2"]);
        assert!(!format!("{m:?} {:?}", m.stream()).contains("hunter2"));
        let source = SecretSource::from_file_contents(b"A=hunter2\n", "f").unwrap();
        let resolved = source.resolve(&["A"]).unwrap();
        assert!(!format!("{source:?} {resolved:?}").contains("hunter2"));
    }

    #[test]
    fn names() {
        for good in ["A", "_", "REEL_DEMO_TOKEN", "a1"] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", "1A", "A-B", "A B", "É"] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn env_with_prefix_then_plain_name() {
        let vars = [
            ("REEL_SECRET_A", "from-prefix"),
            ("A", "plain-a"),
            ("B", "plain-b"),
        ];
        let source = SecretSource::from_env_vars(Some(DEFAULT_ENV_PREFIX), vars);
        let resolved = source.resolve(&["A", "B"]).unwrap();
        assert_eq!(resolved.get("A"), Some("from-prefix"));
        assert_eq!(resolved.get("B"), Some("plain-b"));
        assert_eq!(
            resolved.iter().collect::<Vec<_>>(),
            [("A", "from-prefix"), ("B", "plain-b")]
        );
        let err = source.resolve(&["B", "C", "D"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "secrets \"C\", \"D\" are not set (looked in environment variables REEL_SECRET_<NAME>, then <NAME>)"
        );
        let plain = SecretSource::from_env_vars(None, vars);
        assert_eq!(plain.resolve(&["A"]).unwrap().get("A"), Some("plain-a"));
        assert_eq!(
            plain.resolve(&["C"]).unwrap_err().to_string(),
            "secret \"C\" is not set (looked in environment variables of the same name)"
        );
        assert!(matches!(
            plain.resolve(&["no-good"]),
            Err(SecretError::InvalidName { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn env_value_not_utf8() {
        use std::os::unix::ffi::OsStringExt;
        let source = SecretSource::from_env_vars(
            None,
            [(OsString::from("A"), OsString::from_vec(vec![0xff]))],
        );
        assert_eq!(
            source.resolve(&["A"]).unwrap_err().to_string(),
            "secret \"A\": environment variable A is not valid UTF-8"
        );
    }

    #[test]
    fn secrets_file_format() {
        let text =
            b"# comment\n\n  # indented comment\nA=one\r\nB=two=2 \nC=\nD= spaced \"quoted\"\n";
        let source = SecretSource::from_file_contents(text, "s.env").unwrap();
        let r = source.resolve(&["A", "B", "C", "D"]).unwrap();
        assert_eq!(r.get("A"), Some("one"));
        assert_eq!(r.get("B"), Some("two=2 "));
        assert_eq!(r.get("C"), Some(""));
        assert_eq!(r.get("D"), Some(" spaced \"quoted\""));
        assert_eq!(r.len(), 4);
        assert_eq!(
            source.resolve(&["E"]).unwrap_err().to_string(),
            "secret \"E\" is not set (looked in secrets file s.env)"
        );
        let masker = r.masker();
        assert_eq!(masker.mask(b"one two=2  x"), b"*** ****** x");
    }

    #[test]
    fn malformed_secrets_file_lines() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"A=1\njust-a-secret-value\n",
                "s.env:2: expected NAME=value, a # comment or a blank line",
            ),
            (
                b"\n\nA B=1\n",
                "s.env:3: invalid name before \"=\": use letters, digits and \"_\", not starting with a digit",
            ),
            (
                b"=1\n",
                "s.env:1: invalid name before \"=\": use letters, digits and \"_\", not starting with a digit",
            ),
            (
                b"A=1\n# x\nA=2\n",
                "s.env:3: secret \"A\" is already defined on line 1",
            ),
            (b"A=\xff\n", "s.env:1: not valid UTF-8"),
        ];
        for (text, expected) in cases {
            let err = SecretSource::from_file_contents(text, "s.env").unwrap_err();
            assert_eq!(err.to_string(), *expected);
            assert!(!err.to_string().contains("just-a-secret-value"));
        }
    }

    #[cfg(unix)]
    #[test]
    fn secrets_file_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.env");
        std::fs::write(&path, "REEL_DEMO_TOKEN=abc123\n").unwrap();
        let set_mode =
            |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        set_mode(0o600);
        let source = SecretSource::from_file(&path).unwrap();
        assert_eq!(
            source
                .resolve(&["REEL_DEMO_TOKEN"])
                .unwrap()
                .get("REEL_DEMO_TOKEN"),
            Some("abc123")
        );
        set_mode(0o400);
        assert!(SecretSource::from_file(&path).is_ok());
        for (mode, access) in [
            (0o640, "readable"),
            (0o604, "readable"),
            (0o620, "writable"),
            (0o666, "readable and writable"),
        ] {
            set_mode(mode);
            let err = SecretSource::from_file(&path).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "{p}: refusing to use a secrets file that is {access} by group or others (mode {mode:04o}); run \"chmod 600 {p}\"",
                    p = path.display()
                )
            );
        }
        let missing = dir.path().join("nope");
        let err = SecretSource::from_file(&missing).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "{}: cannot read secrets file: ",
                missing.display()
            )),
            "{err}"
        );
    }
}
