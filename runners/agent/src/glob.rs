//! Artifact patterns, and finding and opening the files they match without
//! leaving a directory.
//!
//! A [`Pattern`] is a relative, `/`-separated path whose segments are
//!
//! | segment | matches |
//! |---|---|
//! | `**` | any number of directories, none included |
//! | `*` in a segment | any run of characters within one segment (a leading `.` too) |
//! | `?` | one character |
//! | anything else | itself |
//!
//! A pattern that matches a directory matches every file below it (`dist`
//! collects `dist/a` and `dist/sub/b`). A pattern is refused when it is empty,
//! absolute, or has a `..` segment; `.` and empty segments are dropped
//! (`./dist//x` is `dist/x`). Only regular files are matched: a symbolic link
//! is never followed, to a file or a directory, inside the tree or out of it.
//!
//! [`find`] walks a directory for the files of a set of patterns, descending
//! only into directories a pattern can match something in; [`open_beneath`]
//! opens one of them component by component with `O_NOFOLLOW`, so a path whose
//! directories were swapped for symbolic links after the walk still cannot
//! leave the directory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::Path;

use rustix::fs::{Mode, OFlags, openat};

/// The longest pattern or path accepted (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// The deepest directory [`find`] descends into, below the root.
pub const MAX_DEPTH: usize = 128;
/// The most directory entries one [`find`] looks at before it gives up.
pub const MAX_ENTRIES: usize = 1_000_000;

/// Why a pattern is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Empty, or only `.` and `/`.
    #[error("the pattern {0:?} names no path inside the work directory")]
    Empty(String),
    /// Starts with `/`.
    #[error("the pattern {0:?} is absolute; artifacts are paths relative to the work directory")]
    Absolute(String),
    /// Has a `..` segment.
    #[error("the pattern {0:?} has a `..` segment; artifacts stay inside the work directory")]
    Parent(String),
    /// Longer than [`MAX_PATH_BYTES`] or holding a NUL.
    #[error("the pattern {0:?} is longer than {MAX_PATH_BYTES} bytes or holds a NUL")]
    Malformed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`.
    AnyDepth,
    /// One path segment, with `*` and `?`.
    Name(Vec<Token>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Char(char),
    Star,
    Question,
}

/// A parsed artifact pattern (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    segments: Vec<Segment>,
}

impl Pattern {
    /// Parses `text`, refusing what the module doc says is refused.
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        let owned = || text.to_owned();
        if text.len() > MAX_PATH_BYTES || text.contains('\0') {
            return Err(PatternError::Malformed(owned()));
        }
        if text.starts_with('/') {
            return Err(PatternError::Absolute(owned()));
        }
        let mut segments = Vec::new();
        for seg in text.split('/') {
            match seg {
                "" | "." => {}
                ".." => return Err(PatternError::Parent(owned())),
                "**" => {
                    // `**/**` is `**`.
                    if segments.last() != Some(&Segment::AnyDepth) {
                        segments.push(Segment::AnyDepth);
                    }
                }
                name => segments.push(Segment::Name(
                    name.chars()
                        .map(|c| match c {
                            '*' => Token::Star,
                            '?' => Token::Question,
                            c => Token::Char(c),
                        })
                        .collect(),
                )),
            }
        }
        if segments.is_empty() {
            return Err(PatternError::Empty(owned()));
        }
        Ok(Pattern {
            text: text.to_owned(),
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern matches the relative path `path` itself.
    pub fn matches(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        match_segments(&self.segments, &parts)
    }

    /// Whether the pattern collects the file at `path`: it matches the path or
    /// a directory above it.
    pub fn covers(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        (1..=parts.len()).any(|n| match_segments(&self.segments, &parts[..n]))
    }

    /// Whether a path below the directory `dir` (segments) could be collected.
    fn may_reach(&self, dir: &[&str]) -> bool {
        (1..=dir.len()).any(|n| match_segments(&self.segments, &dir[..n]))
            || prefix_match(&self.segments, dir)
    }
}

/// Whether `segments` match exactly the path `parts`.
fn match_segments(segments: &[Segment], parts: &[&str]) -> bool {
    match segments.split_first() {
        None => parts.is_empty(),
        Some((Segment::AnyDepth, rest)) => {
            (0..=parts.len()).any(|skip| match_segments(rest, &parts[skip..]))
        }
        Some((Segment::Name(tokens), rest)) => match parts.split_first() {
            Some((part, more)) => match_name(tokens, part) && match_segments(rest, more),
            None => false,
        },
    }
}

/// Whether a path starting with the directories `parts` could match `segments`.
fn prefix_match(segments: &[Segment], parts: &[&str]) -> bool {
    match (segments.split_first(), parts.split_first()) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some((Segment::AnyDepth, _)), Some(_)) => true,
        (Some((Segment::Name(tokens), rest)), Some((part, more))) => {
            match_name(tokens, part) && prefix_match(rest, more)
        }
    }
}

/// Whether one segment's tokens match `name` (`*` any run, `?` one char).
fn match_name(tokens: &[Token], name: &str) -> bool {
    let chars: Vec<char> = name.chars().collect();
    // Iterative wildcard matching with one backtrack point per `*`.
    let (mut t, mut c) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while c < chars.len() {
        match tokens.get(t) {
            Some(Token::Star) => {
                star = Some((t, c));
                t += 1;
            }
            Some(Token::Question) => {
                t += 1;
                c += 1;
            }
            Some(Token::Char(x)) if *x == chars[c] => {
                t += 1;
                c += 1;
            }
            _ => match star {
                Some((st, sc)) => {
                    t = st + 1;
                    c = sc + 1;
                    star = Some((st, sc + 1));
                }
                None => return false,
            },
        }
    }
    tokens[t..].iter().all(|x| *x == Token::Star)
}

/// Every regular file below `root` that one of `patterns` collects, by
/// `/`-separated path relative to `root`, with its size. Symbolic links are not
/// followed; names that are not UTF-8 are skipped. An error if `root` cannot be
/// read, or the walk looks at more than [`MAX_ENTRIES`] entries.
pub fn find(root: &Path, patterns: &[Pattern]) -> io::Result<BTreeMap<String, u64>> {
    let mut found = BTreeMap::new();
    let mut seen = 0usize;
    walk(root, &mut Vec::new(), patterns, &mut found, &mut seen)?;
    Ok(found)
}

fn walk(
    dir: &Path,
    at: &mut Vec<String>,
    patterns: &[Pattern],
    found: &mut BTreeMap<String, u64>,
    seen: &mut usize,
) -> io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        *seen += 1;
        if *seen > MAX_ENTRIES {
            return Err(io::Error::other(format!(
                "more than {MAX_ENTRIES} entries below the work directory"
            )));
        }
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        // Does not follow a symbolic link: a link is neither a file nor a
        // directory here.
        let kind = entry.file_type()?;
        at.push(name);
        let parts: Vec<&str> = at.iter().map(String::as_str).collect();
        if kind.is_dir() {
            if at.len() < MAX_DEPTH && patterns.iter().any(|p| p.may_reach(&parts)) {
                walk(&entry.path(), at, patterns, found, seen)?;
            }
        } else if kind.is_file() {
            let path = parts.join("/");
            if patterns.iter().any(|p| p.covers(&path)) {
                found.insert(path, entry.metadata()?.len());
            }
        }
        at.pop();
    }
    Ok(())
}

/// Why [`open_beneath`] would not open a path.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Not a path a pattern could have found: absolute, `..`, a symbolic link
    /// on the way, or not a regular file.
    #[error("{0}")]
    Refused(String),
    /// The file could not be opened or read.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Opens the regular file at the relative path `rel` below `root` for reading,
/// one component at a time with `O_NOFOLLOW`: no symbolic link is followed on
/// the way or at the end, and nothing outside `root` can be reached. Returns the
/// file and its size.
pub fn open_beneath(root: &Path, rel: &str) -> Result<(File, u64), OpenError> {
    let refused = |why: &str| OpenError::Refused(format!("{rel:?} {why}"));
    if rel.is_empty() || rel.len() > MAX_PATH_BYTES || rel.contains('\0') {
        return Err(refused("is not a relative path"));
    }
    if rel.starts_with('/') {
        return Err(refused("is an absolute path"));
    }
    let parts: Vec<&str> = rel.split('/').collect();
    if parts.iter().any(|p| matches!(*p, "" | "." | "..")) {
        return Err(refused("has an empty, `.` or `..` segment"));
    }
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)?;
    let (last, dirs) = parts.split_last().ok_or_else(|| refused("is empty"))?;
    for d in dirs {
        fd = openat(&fd, *d, dir_flags, Mode::empty()).map_err(|e| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => {
                refused("has a symbolic link or a file where a directory should be")
            }
            e => OpenError::Io(e.into()),
        })?;
    }
    let file_flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
    let fd = openat(&fd, *last, file_flags, Mode::empty()).map_err(|e| match e {
        rustix::io::Errno::LOOP => refused("is a symbolic link"),
        e => OpenError::Io(e.into()),
    })?;
    let stat = rustix::fs::fstat(&fd).map_err(io::Error::from)?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(refused("is not a regular file"));
    }
    Ok((File::from(fd), stat.st_size as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn patterns_are_refused_when_they_could_leave_the_directory() {
        assert!(matches!(
            Pattern::parse("/etc/passwd"),
            Err(PatternError::Absolute(_))
        ));
        assert!(matches!(
            Pattern::parse("../x"),
            Err(PatternError::Parent(_))
        ));
        assert!(matches!(
            Pattern::parse("a/../../x"),
            Err(PatternError::Parent(_))
        ));
        assert!(matches!(Pattern::parse(""), Err(PatternError::Empty(_))));
        assert!(matches!(Pattern::parse("./"), Err(PatternError::Empty(_))));
        assert!(matches!(
            Pattern::parse("a\0b"),
            Err(PatternError::Malformed(_))
        ));
        assert!(matches!(
            Pattern::parse(&"a".repeat(MAX_PATH_BYTES + 1)),
            Err(PatternError::Malformed(_))
        ));
        // `..` inside a name is only a name.
        assert!(p("a..b").matches("a..b"));
        assert_eq!(p("./dist//x").segments, p("dist/x").segments);
    }

    #[test]
    fn stars_questions_and_double_stars() {
        let cases: &[(&str, &str, bool)] = &[
            ("dist/*.tar.gz", "dist/app.tar.gz", true),
            ("dist/*.tar.gz", "dist/.tar.gz", true),
            ("dist/*.tar.gz", "dist/sub/app.tar.gz", false),
            ("dist/*.tar.gz", "dist/app.tar.gzip", false),
            ("report.xml", "report.xml", true),
            ("report.xml", "reportxxml", false),
            ("r?port.*", "report.xml", true),
            ("r?port.*", "rport.xml", false),
            ("**/*.log", "a.log", true),
            ("**/*.log", "x/y/z/a.log", true),
            ("**/*.log", "x/y/z/a.txt", false),
            ("a/**/b", "a/b", true),
            ("a/**/b", "a/x/y/b", true),
            ("a/**/b", "a/x/y/c", false),
            ("**", "anything/at/all", true),
            ("*a*b*c*", "xxaxxbxxcxx", true),
            ("*a*b*c*", "xxaxxcxxbxx", false),
            ("*", "", true),
            ("é?", "éé", true),
        ];
        for (pat, path, want) in cases {
            assert_eq!(p(pat).matches(path), *want, "{pat} vs {path}");
        }
    }

    #[test]
    fn a_pattern_naming_a_directory_covers_everything_below_it() {
        assert!(p("dist").covers("dist/a"));
        assert!(p("dist").covers("dist/sub/b"));
        assert!(!p("dist").covers("distx/a"));
        assert!(p("d*").covers("dist/sub/b"));
        assert!(p("**/sub").covers("dist/sub/b"));
        assert!(!p("dist/*.gz").covers("dist/sub/b.gz"));
        // The walk descends only where a match is possible.
        assert!(p("dist/*.gz").may_reach(&["dist"]));
        assert!(!p("dist/*.gz").may_reach(&["src"]));
        assert!(!p("dist/*.gz").may_reach(&["dist", "sub"]));
        assert!(p("**/*.gz").may_reach(&["src", "deep"]));
    }

    #[test]
    fn find_collects_regular_files_and_follows_no_link() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("work");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("dist/sub")).unwrap();
        std::fs::create_dir_all(root.join("src")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "s3cret").unwrap();
        std::fs::write(root.join("dist/app.tar.gz"), "12345").unwrap();
        std::fs::write(root.join("dist/sub/b.tar.gz"), "1").unwrap();
        std::fs::write(root.join("report.xml"), "<r/>").unwrap();
        std::fs::write(root.join("src/main.rs"), "fn main() {}").unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), root.join("dist/leak.tar.gz")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("dist/out")).unwrap();
        let pats = [p("dist"), p("report.xml"), p("nothing/*")];
        let found = find(&root, &pats).unwrap();
        let names: Vec<(&str, u64)> = found.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(
            names,
            [
                ("dist/app.tar.gz", 5),
                ("dist/sub/b.tar.gz", 1),
                ("report.xml", 4)
            ]
        );
        let found = find(&root, &[p("**/*.tar.gz")]).unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
    }

    #[test]
    fn open_beneath_refuses_links_and_other_files() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("work");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), "hello").unwrap();
        std::fs::write(tmp.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), root.join("link")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), root.join("up")).unwrap();
        let (mut f, size) = open_beneath(&root, "d/f").unwrap();
        assert_eq!(size, 5);
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).unwrap();
        assert_eq!(s, "hello");
        for bad in [
            "link",
            "up/secret",
            "../secret",
            "/etc/hostname",
            "d",
            "d/./f",
            "d//f",
            "",
        ] {
            assert!(
                matches!(open_beneath(&root, bad), Err(OpenError::Refused(_))),
                "{bad:?} was not refused"
            );
        }
        assert!(matches!(
            open_beneath(&root, "d/missing"),
            Err(OpenError::Io(_))
        ));
    }
}
