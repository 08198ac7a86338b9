//! Job files: reel's own YAML format and spindle-style workflows, parsed into a
//! [`JobSpec`].
//!
//! # reel's format
//!
//! ```yaml
//! name: hello                 # default: the file name without its extension
//! runner: process             # default: process
//! image: target/guest/current # optional: `runner: qemu` boots this guest image
//!                             # directory; the process runner has none (warning)
//! resources: { memory: 2G, vcpus: 2, disk_mib: 4096 }
//! environment: { GREETING: hi, RETRIES: 3, VERBOSE: true }
//! secrets: [API_TOKEN]        # names only; values are resolved at run time
//! timeout: 1h30m              # whole-job timeout (queue wait does not count)
//! owner: ci
//! artifacts: [dist/*.tar.gz, report.xml]  # copied out when the steps are done:
//!                             # paths relative to the work directory, with `*`,
//!                             # `?` and `**`; a directory means the files below
//!                             # it; absolute paths and `..` are refused
//! retry: { lost: 2 }          # run again (up to twice) if the job ends `lost`
//! cancel_grace: 10s           # a cancelled step gets 10s after SIGINT, then
//!                             # 10s after SIGTERM, before SIGKILL
//! network: user               # `runner: qemu` only: outbound NAT for the guest,
//!                             # the host and private ranges unreachable; `none`
//!                             # (a microVM's default) for no network at all
//! steps:
//!   - name: greet
//!     command: echo "$GREETING"
//!     environment: { GREETING: hello }
//!     timeout: 30s
//! ```
//!
//! Every key is checked: an unknown key is an error with its line and column, so a
//! typo (`enviroment:`) cannot silently drop configuration.
//!
//! * Durations (`timeout`) are whole seconds (`90`) or a string of `<number><unit>`
//!   parts with units `ms`, `s`, `m`, `h`, `d` (`"30s"`, `"5m"`, `"1h30m"`), and must
//!   be greater than zero.
//! * Sizes (`resources.memory_mib`/`memory`, `resources.disk_mib`/`disk`) are MiB
//!   (`512`) or a string with a binary unit: `M`/`MB`/`Mi`/`MiB`, `G`/`GB`/`Gi`/`GiB`,
//!   `T`/`TB`/`Ti`/`TiB` (`"512M"`, `"2G"`; `G` is always 1024 MiB).
//! * Environment values are scalars taken as written: strings, numbers and booleans
//!   all become the text in the file (`CGO_ENABLED: 1` is `"1"`, `VERSION: 1.10`
//!   stays `"1.10"`).
//!
//! # spindle workflows
//!
//! Files written for spindle (tangled's CI, `.tangled/workflows/*.yml`) are
//! recognised by their `when`, `engine`, `dependencies` or `clone` keys when there is
//! no `runner` key. They map to a `process`-runner job named after the file, with the
//! workflow's `environment` and `steps` (`name`, `command`, `environment`). Whatever
//! the process runner cannot honour is reported as a warning, never skipped silently:
//! `when` triggers, the `engine`, the `image`, `clone` settings, `dependencies`, and
//! any unknown key (top level or in a step). reel also accepts `timeout` at the top
//! level and in steps of a spindle file (spindle itself has no timeout field).
//!
//! # Limits
//!
//! A job file is refused, with a one-line error, before anything of it is run
//! or written, when it is
//!
//! * larger than [`MAX_JOB_FILE_BYTES`] (4 MiB; the file is never read past
//!   that, so `/dev/zero` or an endless FIFO is refused at once);
//! * nested deeper than [`MAX_NESTING`] (32 levels of collections, where a job
//!   needs five), found by a linear scan before the YAML parser runs: the
//!   parser's cost grows with the depth of flow collections, and 100,000 `{a: `
//!   used to take minutes;
//! * more than [`MAX_VALUES`] values (100,000), counted by the same scan and
//!   again, with each alias (`*name`) as the values it repeats, as the parser
//!   expands them; or more than [`MAX_EXPANDED_TEXT`] (16 MiB) of text so
//!   expanded: a few lines of nested aliases can otherwise repeat a value into
//!   gigabytes;
//! * holding a NUL (written `"\0"`) in a command or an environment value, which
//!   no process can be given;
//! * a job over the limits of [`JobSpec::check_size`]: a command or a
//!   `NAME=value` over 128 KiB, a step's command and environment over 768 KiB, a
//!   job over 8 MiB as stored. Errors about one command or value point at it.
//!
//! # Errors and warnings
//!
//! Errors are one line, `ORIGIN:LINE:COLUMN: PATH: message`, e.g.
//! `examples/bad.yml:7:5: steps[1]: missing field "command"`. Warnings have the same
//! shape (`ORIGIN:LINE:COLUMN: key: message`, or `ORIGIN: key: message` where no
//! position is known).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_yaml::Value;

use crate::input::prescan::{self, Refusal};
use crate::model::spec::{
    self, JobSpec, MAX_SPEC_BYTES, Network, Origin, Resources, Retry, StepSpec, size_text,
};

/// The runner a job uses when its file names none (and the only one spindle
/// workflows can map to).
pub const DEFAULT_RUNNER: &str = "process";

/// The spindle engines reel knows by name (others are reported as unknown).
pub const SPINDLE_ENGINES: &[&str] = &["nixery", "microvm"];

/// The largest job file reel reads: 4 MiB. A file is read up to one byte past it
/// and no further, so a device or a pipe that never ends costs 4 MiB of memory.
pub const MAX_JOB_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// How deep collections may nest in a job file: a reel job needs five levels
/// (`steps`, a step, its `environment`), a spindle workflow about as many.
pub const MAX_NESTING: usize = 32;

/// The most values (scalars and collections) a job file may hold, counting each
/// alias as the values it repeats. A real job file holds a few hundred; a 4 MiB
/// file could write two million, which the YAML parser would hold as events
/// (over 250 MB) before refusing anything.
pub const MAX_VALUES: usize = 100_000;

/// The most scalar text a job file may hold, counting each alias as the text it
/// repeats: twice the limit on a job ([`MAX_SPEC_BYTES`]), so that a job a little
/// over that limit is still built and refused with its size, while a few lines
/// of nested aliases stop at 16 MiB instead of growing into gigabytes.
pub const MAX_EXPANDED_TEXT: usize = 2 * MAX_SPEC_BYTES;

/// Which format a job file was written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// reel's own format.
    Reel,
    /// A spindle (tangled CI) workflow.
    Spindle,
}

/// A parsed job file: the spec to run, and what of the file it does not honour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedJob {
    /// The job to run.
    pub spec: JobSpec,
    /// One line per thing in the file that will not take effect, in file order.
    pub warnings: Vec<String>,
    /// The format the file was recognised as.
    pub format: Format,
}

/// A 1-based position in a job file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

/// Why a job file could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum JobFileError {
    /// The file could not be read.
    #[error("{origin}: cannot read job file: {source}")]
    Read {
        /// The path as given.
        origin: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_JOB_FILE_BYTES`]; it was not read past it.
    #[error("{origin}: {}", too_large(*.size))]
    TooLarge {
        /// The path as given.
        origin: String,
        /// Its size, when it is a regular file; `None` for a device or a pipe,
        /// which is only known to go on past the limit.
        size: Option<u64>,
    },
    /// The file is not a valid job file.
    #[error("{origin}{}: {message}", location_suffix(.location))]
    Invalid {
        /// The path (or other name) of the file.
        origin: String,
        /// Where in the file, when known.
        location: Option<Location>,
        /// What is wrong, with the YAML path of the offending value first
        /// (`steps[1]: missing field "command"`).
        message: String,
    },
}

impl JobFileError {
    /// Where in the file the error is, when known.
    pub fn location(&self) -> Option<Location> {
        match self {
            JobFileError::Read { .. } | JobFileError::TooLarge { .. } => None,
            JobFileError::Invalid { location, .. } => *location,
        }
    }
}

fn too_large(size: Option<u64>) -> String {
    let limit = size_text(MAX_JOB_FILE_BYTES as usize);
    match size {
        Some(size) => format!("the job file is {size} bytes, over the {limit} limit on job files"),
        None => format!(
            "the job file goes on past the {limit} limit on job files (it is not a regular file; reading stopped there)"
        ),
    }
}

fn location_suffix(location: &Option<Location>) -> String {
    match location {
        Some(l) => format!(":{}:{}", l.line, l.column),
        None => String::new(),
    }
}

/// Reads and parses a job file; errors and warnings name it as `path` was given.
///
/// Reads at most [`MAX_JOB_FILE_BYTES`] and one byte more: a larger regular file
/// is refused by its size before it is read, anything else (a device, a pipe)
/// once it has gone past the limit.
pub fn parse_job_file(path: &Path) -> Result<ParsedJob, JobFileError> {
    let origin = path.display().to_string();
    let read_error = |source| JobFileError::Read {
        origin: origin.clone(),
        source,
    };
    let too_large = |size| JobFileError::TooLarge {
        origin: origin.clone(),
        size,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    if meta.is_file() && meta.len() > MAX_JOB_FILE_BYTES {
        return Err(too_large(Some(meta.len())));
    }
    let mut bytes = Vec::new();
    file.take(MAX_JOB_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_JOB_FILE_BYTES {
        return Err(too_large(None));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not UTF-8 text (invalid bytes at offset {})",
                e.utf8_error().valid_up_to()
            ),
        ))
    })?;
    parse_job_str(&text, &origin)
}

/// Parses the text of a job file. `origin` names it in errors and warnings, and its
/// file stem is the job's name when the file gives none.
pub fn parse_job_str(text: &str, origin: &str) -> Result<ParsedJob, JobFileError> {
    if text.len() as u64 > MAX_JOB_FILE_BYTES {
        return Err(JobFileError::TooLarge {
            origin: origin.to_string(),
            size: Some(text.len() as u64),
        });
    }
    if let Err(refusal) = prescan::prescan(text, MAX_NESTING, MAX_VALUES) {
        let (at, message) = match refusal {
            Refusal::TooDeep(at) => (
                at,
                format!(
                    "collections nest more than {MAX_NESTING} levels deep here, the limit for job files"
                ),
            ),
            Refusal::TooMany(at) => (at, too_many_values()),
        };
        return Err(JobFileError::Invalid {
            origin: origin.to_string(),
            location: Some(Location {
                line: at.line,
                column: at.column,
            }),
            message,
        });
    }
    // Each pass below expands aliases again; the first one counts what they
    // expand to and stops at the limits, before anything is built.
    let values = Cell::new(0);
    let text_bytes = Cell::new(0);
    de::DeserializeSeed::deserialize(
        Expansion {
            values: &values,
            text: &text_bytes,
        },
        serde_yaml::Deserializer::from_str(text),
    )
    .map_err(|e| yaml_error(origin, text, e))?;
    // A pass into a `Value` reports syntax errors and duplicate keys (with their
    // positions) and tells the two formats apart; the next pass deserializes
    // into typed structs so that every semantic error keeps its position too.
    let value: Value = serde_yaml::from_str(text).map_err(|e| yaml_error(origin, text, e))?;
    let format = match &value {
        Value::Null => {
            return Err(JobFileError::Invalid {
                origin: origin.to_string(),
                location: None,
                message: "the file is empty: a job needs at least a \"steps\" list".to_string(),
            });
        }
        Value::Mapping(map) => {
            let has = |key: &str| map.contains_key(key);
            if !has("runner")
                && ["engine", "when", "dependencies", "clone"]
                    .iter()
                    .any(|k| has(k))
            {
                Format::Spindle
            } else {
                Format::Reel
            }
        }
        _ => Format::Reel,
    };
    let default_name = default_name(origin);
    let parsed = match format {
        Format::Reel => {
            let file: ReelFile =
                serde_yaml::from_str(text).map_err(|e| yaml_error(origin, text, e))?;
            file.into_parsed(text, origin, default_name)
        }
        Format::Spindle => {
            let file: SpindleFile =
                serde_yaml::from_str(text).map_err(|e| yaml_error(origin, text, e))?;
            file.into_parsed(text, origin, default_name)
        }
    };
    // The same check `EventLog::submit` makes, here so that a batch with one job
    // too large starts nothing.
    parsed
        .spec
        .check_size()
        .map_err(|e| JobFileError::Invalid {
            origin: origin.to_string(),
            location: None,
            message: e.to_string(),
        })?;
    Ok(parsed)
}

fn too_many_values() -> String {
    format!(
        "the job file holds more than {MAX_VALUES} values here (an alias counts as the values it repeats), the limit for job files"
    )
}

/// Counts the values of a YAML document as serde_yaml expands them (an alias is
/// replayed wherever it is used) and stops at [`MAX_VALUES`] values or
/// [`MAX_EXPANDED_TEXT`] of scalar text, without building anything.
#[derive(Clone, Copy)]
struct Expansion<'a> {
    values: &'a Cell<usize>,
    text: &'a Cell<usize>,
}

impl Expansion<'_> {
    fn count<E: de::Error>(self, text: usize) -> Result<(), E> {
        let values = self.values.get() + 1;
        let text = self.text.get() + text;
        if values > MAX_VALUES {
            return Err(E::custom(too_many_values()));
        }
        if text > MAX_EXPANDED_TEXT {
            return Err(E::custom(format!(
                "the job file's values hold more than {} of text here (an alias counts as the text it repeats); a job takes at most {}",
                size_text(MAX_EXPANDED_TEXT),
                size_text(MAX_SPEC_BYTES)
            )));
        }
        self.values.set(values);
        self.text.set(text);
        Ok(())
    }
}

impl<'de> de::DeserializeSeed<'de> for Expansion<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Expansion<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.count(0)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.count(0)
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.count(0)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.count(0)
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.count(0)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.count(0)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.count(v.len())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.count(0)
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.count(0)
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.count(0)?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.count(0)?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged value (`!tag value`): the tag, then the value.
        let ((), variant) = data.variant_seed(self)?;
        de::VariantAccess::newtype_variant_seed(variant, self)
    }
}

/// The job name used when the file has none: the file name without its extension.
fn default_name(origin: &str) -> String {
    Path::new(origin)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "job".to_string())
}

/// Turns a serde_yaml error into a one-line [`JobFileError::Invalid`].
fn yaml_error(origin: &str, text: &str, err: serde_yaml::Error) -> JobFileError {
    let mut location = err.location().map(|l| Location {
        line: l.line(),
        column: l.column(),
    });
    let mut message = err.to_string();
    if let Some(l) = location {
        // serde_yaml appends the position in words; it is in the prefix already.
        let words = format!(" at line {} column {}", l.line, l.column);
        if let Some(at) = message.find(&words) {
            message.replace_range(at..at + words.len(), "");
        }
    }
    // serde_yaml reports a duplicate key at the start of its mapping: point at the
    // repeated key instead when the mapping is in block style.
    const DUPLICATE: &str = "duplicate entry with key ";
    if let Some(at) = message.find(DUPLICATE) {
        let (path, quoted) = (
            message[..at].to_string(),
            message[at + DUPLICATE.len()..].to_string(),
        );
        let key = quoted.trim_matches('"');
        message = format!("{path}duplicate key {quoted}");
        if let Some((first, second)) = location
            .filter(|_| !key.contains(['\\', '"']))
            .and_then(|start| find_duplicate_key(text, start, key))
        {
            message.push_str(&format!(" (first on line {first})"));
            location = Some(second);
        }
    }
    let message = message.replace('`', "\"").replace(['\n', '\r'], " ");
    JobFileError::Invalid {
        origin: origin.to_string(),
        location,
        message,
    }
}

/// Finds the first and second occurrence of `key` in the block mapping that starts
/// at `start`: the first's line and the second's location.
fn find_duplicate_key(text: &str, start: Location, key: &str) -> Option<(usize, Location)> {
    let indent = start.column.checked_sub(1)?;
    let mut first = None;
    for (i, line) in text.lines().enumerate().skip(start.line.checked_sub(1)?) {
        let content = line.trim_start_matches(' ');
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let is_start = i + 1 == start.line;
        if !is_start && line.len() - content.len() < indent {
            break;
        }
        if !is_start && line.len() - content.len() != indent {
            continue;
        }
        let Some(rest) = line.get(indent..) else {
            continue;
        };
        let written = ["", "\"", "'"].iter().find_map(|quote| {
            rest.strip_prefix(quote)?
                .strip_prefix(key)?
                .strip_prefix(quote)?
                .trim_start_matches(' ')
                .strip_prefix(':')
        });
        if written.is_some_and(|after| after.is_empty() || after.starts_with([' ', '\t'])) {
            match first {
                None => first = Some(i + 1),
                Some(first) => {
                    return Some((
                        first,
                        Location {
                            line: i + 1,
                            column: start.column,
                        },
                    ));
                }
            }
        }
    }
    None
}

/// Finds the 1-based line of a top-level key written in block style at column 1.
fn top_level_key_line(text: &str, key: &str) -> Option<usize> {
    text.lines().enumerate().find_map(|(i, line)| {
        let first = line.chars().next()?;
        if first.is_whitespace() || matches!(first, '#' | '-' | '.' | '{' | '[') {
            return None;
        }
        let written = match first {
            '"' | '\'' => {
                let rest = &line[1..];
                &rest[..rest.find(first)?]
            }
            _ => line.split(':').next()?.trim_end(),
        };
        (written == key).then_some(i + 1)
    })
}

/// Formats a warning about a top-level key, with its position when it can be found.
fn key_warning(text: &str, origin: &str, key: &str, message: &str) -> String {
    match top_level_key_line(text, key) {
        Some(line) => format!("{origin}:{line}:1: {key}: {message}"),
        None => format!("{origin}: {key}: {message}"),
    }
}

// ---------------------------------------------------------------------------------
// Scalar types with their own syntax.

/// A duration in milliseconds: whole seconds or `"1h30m"`-style text.
struct Millis(u64);

const DURATION_HELP: &str =
    "expected whole seconds or a duration like \"30s\", \"5m\" or \"1h30m\"";

/// Parses `"30s"`, `"5m"`, `"1h30m"`, `"500ms"`, `"2d"`, `"90"` (seconds) to ms.
/// (Also the syntax of `reel serve`'s durations.)
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let bad = || format!("invalid duration \"{text}\": {DURATION_HELP}");
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(bad());
    }
    if trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return trimmed
            .parse::<u64>()
            .ok()
            .and_then(|s| s.checked_mul(1000))
            .ok_or_else(bad);
    }
    let mut total: u64 = 0;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let letters = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms: u64 = match &rest[..letters] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        rest = rest[letters..].trim_start();
        total = number
            .checked_mul(unit_ms)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(bad)?;
    }
    Ok(total)
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Millis;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(DURATION_HELP.trim_start_matches("expected "))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Millis, E> {
                if v == 0 {
                    return Err(E::custom("a timeout must be greater than zero"));
                }
                v.checked_mul(1000)
                    .map(Millis)
                    .ok_or_else(|| E::custom(format!("duration {v} is too large")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Millis, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("invalid duration {v}: {DURATION_HELP}"))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Millis, E> {
                Err(E::custom(format!("invalid duration {v}: {DURATION_HELP}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Millis, E> {
                match parse_duration(v).map_err(E::custom)? {
                    0 => Err(E::custom("a timeout must be greater than zero")),
                    ms => Ok(Millis(ms)),
                }
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A size in MiB: a number of MiB or `"512M"`/`"2G"`-style text.
#[derive(Default)]
struct Mib(u64);

const SIZE_HELP: &str = "expected MiB or a size like \"512M\" or \"2G\"";

/// Parses `"512M"`, `"2G"`, `"512"` (MiB) to MiB (also `reel serve`'s sizes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("invalid size \"{text}\": {SIZE_HELP}");
    let trimmed = text.trim();
    let digits = trimmed.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(bad());
    }
    let number: u64 = trimmed[..digits].parse().map_err(|_| bad())?;
    let unit = trimmed[digits..].trim_start().to_ascii_lowercase();
    let factor: u64 = match unit.as_str() {
        "" | "m" | "mb" | "mi" | "mib" => 1,
        "g" | "gb" | "gi" | "gib" => 1024,
        "t" | "tb" | "ti" | "tib" => 1024 * 1024,
        _ => return Err(bad()),
    };
    number.checked_mul(factor).ok_or_else(bad)
}

impl<'de> Deserialize<'de> for Mib {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Mib;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(SIZE_HELP.trim_start_matches("expected "))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Mib, E> {
                Ok(Mib(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Mib, E> {
                u64::try_from(v)
                    .map(Mib)
                    .map_err(|_| E::custom(format!("invalid size {v}: {SIZE_HELP}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Mib, E> {
                Err(E::custom(format!("invalid size {v}: {SIZE_HELP}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Mib, E> {
                parse_size(v).map(Mib).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// Deserializes a scalar's text and checks it inside serde_yaml's call, so that an
/// error points at the scalar itself rather than at its enclosing collection.
fn checked_str<'de, D, F>(
    deserializer: D,
    expecting: &'static str,
    check: F,
) -> Result<String, D::Error>
where
    D: Deserializer<'de>,
    F: FnOnce(&str) -> Result<(), String>,
{
    struct V<F>(F, &'static str);
    impl<'de, F: FnOnce(&str) -> Result<(), String>> Visitor<'de> for V<F> {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.1)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            (self.0)(v).map_err(E::custom)?;
            Ok(v.to_string())
        }
    }
    // `deserialize_str` hands over any scalar's text as written, so `1.10` stays
    // "1.10" and `0x1F` stays "0x1F"; sequences and mappings are refused.
    deserializer.deserialize_str(V(check, expecting))
}

/// A shell command: any non-blank string.
struct Command(String);

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_str(deserializer, "a shell command", |command| {
            if command.trim().is_empty() {
                return Err("the command is empty".to_string());
            }
            if command.contains('\0') {
                return Err("a command cannot contain NUL".to_string());
            }
            spec::check_command(command)
                .map_err(|size| spec::exec_string_problem("the command", size))
        })
        .map(Command)
    }
}

/// An environment variable name: non-empty, without `=` or NUL.
struct EnvName(String);

impl<'de> Deserialize<'de> for EnvName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_str(deserializer, "an environment variable name", |name| {
            if name.is_empty() || name.contains(['=', '\0']) {
                return Err(format!(
                    "invalid environment variable name \"{}\": it must be non-empty, without \"=\" or NUL",
                    name.escape_default()
                ));
            }
            Ok(())
        })
        .map(EnvName)
    }
}

/// An environment variable's value: any scalar, as written; checked with its
/// name, whose `NAME=value` must fit in one exec string.
struct EnvValueSeed<'a>(&'a str);

impl<'de> de::DeserializeSeed<'de> for EnvValueSeed<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        checked_str(deserializer, "a string, number or boolean", |value| {
            if value.contains('\0') {
                return Err("an environment variable value cannot contain NUL".to_string());
            }
            // The path before the message names the variable.
            spec::check_variable(self.0, value)
                .map_err(|size| spec::exec_string_problem("the variable (NAME=value)", size))
        })
    }
}

/// An environment map whose names are checked and values stringified.
#[derive(Default)]
struct Env(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for Env {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Env;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping of variable names to values")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Env, E> {
                Ok(Env::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Env, A::Error> {
                let mut env = BTreeMap::new();
                while let Some(EnvName(name)) = map.next_key()? {
                    let value = map.next_value_seed(EnvValueSeed(&name))?;
                    env.insert(name, value);
                }
                Ok(Env(env))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// The `secrets` list: valid names, each once.
#[derive(Default)]
struct SecretNames(Vec<String>);

/// One secret name, checked against the names before it.
struct SecretNameSeed<'a>(&'a [String]);

impl<'de> de::DeserializeSeed<'de> for SecretNameSeed<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        checked_str(deserializer, "a secret name", |name| {
            if !crate::input::secrets::is_valid_name(name) {
                return Err(format!(
                    "invalid secret name \"{}\": use letters, digits and \"_\", not starting with a digit",
                    name.escape_default()
                ));
            }
            if self.0.iter().any(|n| n == name) {
                return Err(format!("secret \"{name}\" is listed twice"));
            }
            Ok(())
        })
    }
}

impl<'de> Deserialize<'de> for SecretNames {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SecretNames;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of secret names")
            }
            fn visit_unit<E: de::Error>(self) -> Result<SecretNames, E> {
                Ok(SecretNames::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SecretNames, A::Error> {
                let mut names: Vec<String> = Vec::new();
                while let Some(name) = seq.next_element_seed(SecretNameSeed(&names))? {
                    names.push(name);
                }
                Ok(SecretNames(names))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// The `artifacts` list: patterns relative to the work directory.
#[derive(Default)]
struct ArtifactPatterns(Vec<String>);

impl<'de> Deserialize<'de> for ArtifactPatterns {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct One(String);
        impl<'de> Deserialize<'de> for One {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                checked_str(deserializer, "an artifact path or pattern", |p| {
                    spec::check_artifact_pattern(p)
                })
                .map(One)
            }
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ArtifactPatterns;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of paths or patterns relative to the work directory")
            }
            fn visit_unit<E: de::Error>(self) -> Result<ArtifactPatterns, E> {
                Ok(ArtifactPatterns::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ArtifactPatterns, A::Error> {
                let mut patterns = Vec::new();
                while let Some(One(p)) = seq.next_element()? {
                    patterns.push(p);
                }
                Ok(ArtifactPatterns(patterns))
            }
        }
        deserializer.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------
// reel's format.

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a job: a mapping with a \"steps\" list"
)]
struct ReelFile {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    runner: Option<String>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    resources: Option<ReelResources>,
    #[serde(default)]
    environment: Env,
    #[serde(default)]
    secrets: SecretNames,
    #[serde(default)]
    timeout: Option<Millis>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    artifacts: ArtifactPatterns,
    #[serde(default)]
    retry: Option<ReelRetry>,
    #[serde(default)]
    cancel_grace: Option<Millis>,
    #[serde(default)]
    network: NetworkWord,
    steps: ReelSteps,
}

/// `network:`: `none` or `user` (`default`, the runner's choice, is what an
/// absent key means).
#[derive(Default)]
struct NetworkWord(Network);

impl<'de> Deserialize<'de> for NetworkWord {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = NetworkWord;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"none\" or \"user\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<NetworkWord, E> {
                Network::parse(v).map(NetworkWord).ok_or_else(|| {
                    E::custom(format!(
                        "unknown network \"{v}\": expected \"none\" (no network) or \"user\" (outbound NAT)"
                    ))
                })
            }
        }
        deserializer.deserialize_str(V)
    }
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of retries, e.g. { lost: 2 }"
)]
struct ReelRetry {
    #[serde(default)]
    lost: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of resources")]
struct ReelResources {
    #[serde(default, alias = "memory")]
    memory_mib: Mib,
    #[serde(default)]
    vcpus: u32,
    #[serde(default, alias = "disk")]
    disk_mib: Mib,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a step: a mapping with a \"command\""
)]
struct ReelStep {
    #[serde(default)]
    name: Option<String>,
    command: Command,
    #[serde(default)]
    environment: Env,
    #[serde(default)]
    timeout: Option<Millis>,
}

/// The `steps` list of a reel job: at least one step.
struct ReelSteps(Vec<ReelStep>);

impl<'de> Deserialize<'de> for ReelSteps {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ReelSteps;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of steps")
            }
            fn visit_unit<E: de::Error>(self) -> Result<ReelSteps, E> {
                Err(E::custom("a job needs at least one step"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ReelSteps, A::Error> {
                let mut steps = Vec::new();
                while let Some(step) = seq.next_element()? {
                    steps.push(step);
                }
                if steps.is_empty() {
                    return Err(de::Error::custom("a job needs at least one step"));
                }
                Ok(ReelSteps(steps))
            }
        }
        deserializer.deserialize_any(V)
    }
}

fn step_name(name: Option<String>, index: usize) -> String {
    match name {
        Some(name) if !name.trim().is_empty() => name,
        _ => format!("step {}", index + 1),
    }
}

impl ReelFile {
    fn into_parsed(self, text: &str, origin: &str, default_name: String) -> ParsedJob {
        let runner = self
            .runner
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_RUNNER.to_string());
        let mut warnings = Vec::new();
        if let Some(image) = &self.image
            && runner == DEFAULT_RUNNER
        {
            warnings.push(key_warning(
                text,
                origin,
                "image",
                &format!(
                    "\"{image}\" is ignored: the process runner has no images; steps run on this host"
                ),
            ));
        }
        let resources = self
            .resources
            .map(|r| Resources {
                memory_mib: r.memory_mib.0,
                vcpus: r.vcpus,
                disk_mib: r.disk_mib.0,
            })
            .unwrap_or_default();
        let steps = self
            .steps
            .0
            .into_iter()
            .enumerate()
            .map(|(i, step)| StepSpec {
                name: step_name(step.name, i),
                command: step.command.0,
                environment: step.environment.0,
                timeout_ms: step.timeout.map(|t| t.0),
            })
            .collect();
        ParsedJob {
            spec: JobSpec {
                name: self
                    .name
                    .filter(|n| !n.trim().is_empty())
                    .unwrap_or(default_name),
                runner,
                image: self.image,
                resources,
                environment: self.environment.0,
                secrets: self.secrets.0,
                steps,
                timeout_ms: self.timeout.map(|t| t.0),
                owner: self.owner.unwrap_or_default(),
                artifacts: self.artifacts.0,
                retry: Retry {
                    lost: self.retry.map_or(0, |r| r.lost),
                },
                cancel_grace_ms: self.cancel_grace.map(|t| t.0),
                origin: Origin::default(),
                network: self.network.0,
            },
            warnings,
            format: Format::Reel,
        }
    }
}

// ---------------------------------------------------------------------------------
// spindle workflows.

/// A spindle workflow. Keys are read by hand so that unknown ones become warnings
/// while known ones keep serde_yaml's error positions.
#[derive(Default)]
struct SpindleFile {
    /// Top-level keys in file order, with their values for those the process runner
    /// ignores (`None` for the keys it honours).
    keys: Vec<(String, Option<Value>)>,
    environment: Env,
    steps: Option<Vec<SpindleStep>>,
    timeout: Option<Millis>,
}

struct SpindleStep {
    name: Option<String>,
    command: String,
    environment: Env,
    timeout: Option<Millis>,
    unknown: Vec<String>,
}

impl<'de> Deserialize<'de> for SpindleFile {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SpindleFile;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a spindle workflow: a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SpindleFile, A::Error> {
                let mut file = SpindleFile::default();
                while let Some(key) = map.next_key::<String>()? {
                    let ignored = match key.as_str() {
                        "environment" => {
                            file.environment = map.next_value()?;
                            None
                        }
                        "steps" => {
                            file.steps = map.next_value::<Option<SpindleSteps>>()?.map(|s| s.0);
                            None
                        }
                        "timeout" => {
                            file.timeout = map.next_value()?;
                            None
                        }
                        _ => Some(map.next_value::<Value>()?),
                    };
                    file.keys.push((key, ignored));
                }
                Ok(file)
            }
        }
        deserializer.deserialize_map(V)
    }
}

struct SpindleSteps(Vec<SpindleStep>);

impl<'de> Deserialize<'de> for SpindleSteps {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SpindleSteps;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of steps")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SpindleSteps, A::Error> {
                let mut steps = Vec::new();
                while let Some(step) = seq.next_element()? {
                    steps.push(step);
                }
                Ok(SpindleSteps(steps))
            }
        }
        deserializer.deserialize_seq(V)
    }
}

impl<'de> Deserialize<'de> for SpindleStep {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SpindleStep;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a step: a mapping with a \"command\"")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SpindleStep, A::Error> {
                let mut name = None;
                let mut command = None;
                let mut environment = Env::default();
                let mut timeout = None;
                let mut unknown = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "name" => name = map.next_value()?,
                        "command" => command = Some(map.next_value::<Command>()?.0),
                        "environment" => environment = map.next_value()?,
                        "timeout" => timeout = map.next_value()?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            unknown.push(key);
                        }
                    }
                }
                let command = command.ok_or_else(|| de::Error::missing_field("command"))?;
                Ok(SpindleStep {
                    name,
                    command,
                    environment,
                    timeout,
                    unknown,
                })
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// The scalars of a value, flattened in order (`["push", "pull_request"]`).
fn scalars(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Number(n) => vec![n.to_string()],
        Value::Bool(b) => vec![b.to_string()],
        Value::Sequence(items) => items.iter().flat_map(scalars).collect(),
        Value::Tagged(tagged) => scalars(&tagged.value),
        Value::Null | Value::Mapping(_) => Vec::new(),
    }
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => serde_yaml::to_string(other)
            .map(|s| s.trim().replace('\n', " "))
            .unwrap_or_default(),
    }
}

/// `push or pull_request on master; push on main`, from a `when` list.
fn describe_when(value: &Value) -> String {
    let Value::Sequence(items) = value else {
        return String::new();
    };
    let triggers: Vec<String> = items
        .iter()
        .filter_map(|item| {
            let map = item.as_mapping()?;
            let events = map.get("event").map(scalars).unwrap_or_default();
            let mut text = if events.is_empty() {
                "any event".to_string()
            } else {
                events.join(" or ")
            };
            for (key, label) in [("branch", "on"), ("tag", "on tag")] {
                let values = map.get(key).map(scalars).unwrap_or_default();
                if !values.is_empty() {
                    text.push_str(&format!(" {label} {}", values.join(" or ")));
                }
            }
            Some(text)
        })
        .collect();
    triggers.join("; ")
}

/// `nixpkgs: zig, rust` or `go, gcc`, from a `dependencies` list or map.
fn describe_dependencies(value: &Value) -> String {
    match value {
        Value::Mapping(sets) => sets
            .iter()
            .map(|(set, packages)| {
                format!("{}: {}", scalar_text(set), scalars(packages).join(", "))
            })
            .collect::<Vec<_>>()
            .join("; "),
        other => scalars(other).join(", "),
    }
}

fn describe_mapping(value: &Value) -> String {
    match value {
        Value::Mapping(map) => map
            .iter()
            .map(|(k, v)| format!("{}={}", scalar_text(k), scalar_text(v)))
            .collect::<Vec<_>>()
            .join(", "),
        other => scalar_text(other),
    }
}

impl SpindleFile {
    fn into_parsed(self, text: &str, origin: &str, default_name: String) -> ParsedJob {
        let engine = self.keys.iter().find_map(|(k, v)| match (k.as_str(), v) {
            ("engine", Some(v)) => Some(scalar_text(v)),
            _ => None,
        });
        let mut warnings = Vec::new();
        for (key, value) in &self.keys {
            let Some(value) = value else { continue };
            let message = match key.as_str() {
                "when" => {
                    let triggers = describe_when(value);
                    let mut m = "triggers are not evaluated by `reel run`: the steps run now, \
                                 whatever the event or branch"
                        .to_string();
                    if !triggers.is_empty() {
                        m.push_str(&format!(" (ignored: {triggers})"));
                    }
                    m
                }
                "engine" => {
                    let name = scalar_text(value);
                    if SPINDLE_ENGINES.contains(&name.as_str()) {
                        format!(
                            "spindle engine \"{name}\" is not used: steps run directly on this host with the process runner"
                        )
                    } else {
                        format!(
                            "unknown spindle engine \"{name}\": steps run directly on this host with the process runner"
                        )
                    }
                }
                "image" => format!(
                    "\"{}\" is ignored: the process runner has no images; steps run on this host",
                    scalar_text(value)
                ),
                "clone" => {
                    let skipped = value.get("skip").and_then(Value::as_bool).unwrap_or(false);
                    if skipped {
                        // Skipping the clone is exactly what happens.
                        continue;
                    }
                    let settings = describe_mapping(value);
                    let mut m = "no repository is cloned: steps run in the runner's work \
                                 directory, not in a checkout"
                        .to_string();
                    if !settings.is_empty() {
                        m.push_str(&format!(" (ignored: {settings})"));
                    }
                    m
                }
                "dependencies" => {
                    let deps = describe_dependencies(value);
                    if deps.is_empty() {
                        "not installed: steps use whatever is on this host's PATH".to_string()
                    } else {
                        format!("not installed ({deps}): steps use whatever is on this host's PATH")
                    }
                }
                _ => {
                    let mut m = "unknown key, ignored".to_string();
                    if engine.as_deref() == Some(key.as_str()) {
                        m.push_str(&format!(
                            " (settings for engine \"{key}\", which reel does not run)"
                        ));
                    }
                    m
                }
            };
            warnings.push(key_warning(text, origin, key, &message));
        }
        let steps = self.steps.unwrap_or_default();
        if steps.is_empty() {
            warnings.push(key_warning(
                text,
                origin,
                "steps",
                "the workflow has no steps: the job runs nothing",
            ));
        }
        for (i, step) in steps.iter().enumerate() {
            for key in &step.unknown {
                warnings.push(format!("{origin}: steps[{i}].{key}: unknown key, ignored"));
            }
        }
        let steps = steps
            .into_iter()
            .enumerate()
            .map(|(i, step)| StepSpec {
                name: step_name(step.name, i),
                command: step.command,
                environment: step.environment.0,
                timeout_ms: step.timeout.map(|t| t.0),
            })
            .collect();
        ParsedJob {
            spec: JobSpec {
                name: default_name,
                runner: DEFAULT_RUNNER.to_string(),
                image: None,
                resources: Resources::default(),
                environment: self.environment.0,
                secrets: Vec::new(),
                steps,
                timeout_ms: self.timeout.map(|t| t.0),
                owner: String::new(),
                ..JobSpec::default()
            },
            warnings,
            format: Format::Spindle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(30_000));
        assert_eq!(parse_duration("5m"), Ok(300_000));
        assert_eq!(parse_duration("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration("1h 30m"), Ok(5_400_000));
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert_eq!(parse_duration("2d"), Ok(172_800_000));
        assert_eq!(parse_duration("90"), Ok(90_000));
        for bad in ["", "s", "5x", "1.5s", "-3s", "h1", "99999999999999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512M"), Ok(512));
        assert_eq!(parse_size("512 MiB"), Ok(512));
        assert_eq!(parse_size("2G"), Ok(2048));
        assert_eq!(parse_size("2gib"), Ok(2048));
        assert_eq!(parse_size("1T"), Ok(1024 * 1024));
        for bad in ["", "G", "2K", "1.5G", "-1"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn top_level_keys_are_found() {
        let text = "# c\nwhen:\n  - event: push\n\"engine\": tack\ntack:\n  engine: x\n";
        assert_eq!(top_level_key_line(text, "when"), Some(2));
        assert_eq!(top_level_key_line(text, "engine"), Some(4));
        assert_eq!(top_level_key_line(text, "tack"), Some(5));
        assert_eq!(top_level_key_line(text, "event"), None);
    }

    #[test]
    fn default_name_is_the_file_stem() {
        assert_eq!(default_name("a/b/test.yml"), "test");
        assert_eq!(default_name("hello"), "hello");
        assert_eq!(default_name(""), "job");
    }
}
