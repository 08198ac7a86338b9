//! A linear scan of a YAML text before it is parsed: how deep it nests, and
//! how many values it writes.
//!
//! serde_yaml parses with libyaml's scanner, whose work per token grows with the
//! number of open flow collections (`[` and `{`): it keeps a simple-key slot for
//! each and walks them at every token. So 100,000 `[` take seconds and 100,000
//! `{a: ` minutes of CPU, all spent before serde_yaml's own recursion limit
//! (128 levels) can refuse anything: that limit applies only later, when the
//! parsed events become values. And the parser keeps every event of a document
//! in memory before the first value is built: over 250 MB for the two million
//! values a 4 MiB file can hold.
//!
//! This pass follows libyaml's token boundaries (quoted, plain and block scalars,
//! comments, anchors, tags and the block indentation that decides where a scalar
//! ends) without building anything, and reports where the nesting first goes
//! deeper, or the values first grow more, than a bound. It must never see *less*
//! nesting than libyaml does, or a deep file would pass and be slow; a scan that
//! only approximates YAML can be fooled (a quote that libyaml reads as text but
//! the scan as the start of a string hides every `[` up to the next quote), so
//! this one mirrors libyaml's scanner rule for rule, and the names below are
//! libyaml's (`scanner.c`, through `unsafe-libyaml`). It differs only where
//! libyaml stops with an error: what the scan does past that point cannot
//! matter, because libyaml never gets there.
//!
//! The depth it measures is what libyaml nests: open flow collections plus block
//! collections (one per indentation level libyaml opens; a sequence written at
//! its parent's indentation opens none, so block nesting can be counted short,
//! which is harmless: serde_yaml refuses deep block nesting quickly by itself).
//! The values it counts are the scalars, aliases and collections written (not
//! the empty values YAML implies, nor what aliases repeat: the caller counts
//! those as they are expanded).

/// A 1-based line and column (in characters), as serde_yaml reports positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) line: usize,
    pub(crate) column: usize,
}

/// Why a text is refused before it is parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The nesting first went deeper than the bound here.
    TooDeep(Position),
    /// The values first went past the bound here.
    TooMany(Position),
}

/// The deepest nesting a text reaches, for tests: flow collections alone, and
/// flow and block collections together.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Depths {
    pub(crate) flow: usize,
    pub(crate) total: usize,
}

/// Refuses `text` where it first nests deeper than `max_depth` or writes more
/// than `max_values` values.
pub(crate) fn prescan(text: &str, max_depth: usize, max_values: usize) -> Result<(), Refusal> {
    match Scanner::new(text, max_depth, max_values).run() {
        Err(Halt::Refused(refusal)) => Err(refusal),
        Ok(()) | Err(Halt::Error) => Ok(()),
    }
}

/// The deepest nesting of `text` (up to where libyaml would stop with an error).
#[cfg(test)]
pub(crate) fn depths(text: &str) -> Depths {
    let mut scanner = Scanner::new(text, usize::MAX, usize::MAX);
    let _ = scanner.run();
    scanner.deepest
}

/// Why the scan stopped early.
enum Halt {
    /// libyaml stops with an error here; nothing after it is ever parsed.
    Error,
    /// The text is refused here.
    Refused(Refusal),
}

/// The simple-key slot of the block context (libyaml keeps one per flow level;
/// only the block context's decides indentation, through `roll_indent`).
#[derive(Clone, Copy, Default)]
struct Key {
    possible: bool,
    index: usize,
    line: usize,
    column: usize,
}

struct Scanner<'a> {
    s: &'a [u8],
    /// Byte offset: libyaml's `mark.index`.
    pos: usize,
    /// From 0, as libyaml counts.
    line: usize,
    /// In characters, from 0.
    column: usize,
    flow_level: usize,
    indent: isize,
    indents: Vec<isize>,
    simple_key_allowed: bool,
    key: Key,
    max_depth: usize,
    max_values: usize,
    values: usize,
    #[cfg(test)]
    deepest: Depths,
}

/// Whether libyaml's reader accepts a character (YAML 1.1's printable set); it
/// refuses the first one it does not, so nothing past it is ever scanned.
fn readable(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{85}')
        || ('\u{20}'..='\u{7e}').contains(&c)
        || ('\u{a0}'..='\u{d7ff}').contains(&c)
        || ('\u{e000}'..='\u{fffd}').contains(&c)
        || c >= '\u{10000}'
}

impl<'a> Scanner<'a> {
    fn new(text: &'a str, max_depth: usize, max_values: usize) -> Scanner<'a> {
        // The reader drops a byte-order mark at the very start before counting
        // positions, and stops at the first character it cannot read.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let end = text
            .char_indices()
            .find(|&(_, c)| !readable(c))
            .map_or(text.len(), |(i, _)| i);
        Scanner {
            s: &text.as_bytes()[..end],
            pos: 0,
            line: 0,
            column: 0,
            flow_level: 0,
            indent: -1,
            indents: Vec::new(),
            simple_key_allowed: true,
            key: Key::default(),
            max_depth,
            max_values,
            values: 0,
            #[cfg(test)]
            deepest: Depths::default(),
        }
    }

    // Bytes at an offset from the position, as libyaml's `CHECK_AT` macros look
    // at them (the end of the text reads as NUL, libyaml's `IS_Z`).

    fn at(&self, k: usize) -> u8 {
        self.s.get(self.pos + k).copied().unwrap_or(0)
    }

    fn is_z(&self, k: usize) -> bool {
        self.pos + k >= self.s.len()
    }

    fn is_blank(&self, k: usize) -> bool {
        matches!(self.at(k), b' ' | b'\t')
    }

    /// The byte length of the line break at `k`, or 0.
    fn break_len(&self, k: usize) -> usize {
        match (self.at(k), self.at(k + 1), self.at(k + 2)) {
            (b'\r' | b'\n', _, _) => 1,
            (0xc2, 0x85, _) => 2,
            (0xe2, 0x80, 0xa8 | 0xa9) => 3,
            _ => 0,
        }
    }

    fn is_break(&self, k: usize) -> bool {
        self.break_len(k) > 0
    }

    fn is_breakz(&self, k: usize) -> bool {
        self.is_break(k) || self.is_z(k)
    }

    fn is_blankz(&self, k: usize) -> bool {
        self.is_blank(k) || self.is_breakz(k)
    }

    fn is_alpha(&self, k: usize) -> bool {
        matches!(self.at(k), b'0'..=b'9' | b'A'..=b'Z' | b'a'..=b'z' | b'_' | b'-')
    }

    /// `---` or `...` at the start of a line, followed by a blank or the end.
    fn document_indicator(&self) -> bool {
        let rest = self.rest();
        self.column == 0
            && (rest.starts_with(b"---") || rest.starts_with(b"..."))
            && self.is_blankz(3)
    }

    fn rest(&self) -> &[u8] {
        self.s.get(self.pos..).unwrap_or_default()
    }

    /// `SKIP`: one character.
    fn skip(&mut self) {
        if self.is_z(0) {
            return;
        }
        let width = match self.at(0) {
            b if b < 0x80 => 1,
            b if b >= 0xf0 => 4,
            b if b >= 0xe0 => 3,
            _ => 2,
        };
        self.pos += width;
        self.column += 1;
    }

    /// `SKIP_LINE`: one line break (`\r\n` is one).
    fn skip_line(&mut self) {
        if self.at(0) == b'\r' && self.at(1) == b'\n' {
            self.pos += 2;
        } else {
            self.pos += self.break_len(0);
        }
        self.column = 0;
        self.line += 1;
    }

    fn position(line: usize, column: usize) -> Position {
        Position {
            line: line + 1,
            column: column + 1,
        }
    }

    /// Counts a value written at `line`/`column`.
    fn value(&mut self, line: usize, column: usize) -> Result<(), Halt> {
        self.values += 1;
        if self.values > self.max_values {
            return Err(Halt::Refused(Refusal::TooMany(Self::position(
                line, column,
            ))));
        }
        Ok(())
    }

    /// Counts a collection opened at `line`/`column`, and checks the depth.
    fn collection(&mut self, line: usize, column: usize) -> Result<(), Halt> {
        self.value(line, column)?;
        let total = self.indents.len() + self.flow_level;
        #[cfg(test)]
        {
            self.deepest.flow = self.deepest.flow.max(self.flow_level);
            self.deepest.total = self.deepest.total.max(total);
        }
        if total > self.max_depth {
            return Err(Halt::Refused(Refusal::TooDeep(Self::position(
                line, column,
            ))));
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), Halt> {
        loop {
            self.fetch_next_token()?;
            if self.is_z(0) {
                return Ok(());
            }
        }
    }

    fn fetch_next_token(&mut self) -> Result<(), Halt> {
        self.scan_to_next_token();
        self.stale_simple_keys();
        self.unroll_indent(self.column as isize);
        if self.is_z(0) {
            return Ok(());
        }
        let c = self.at(0);
        let flow = self.flow_level > 0;
        if self.column == 0 && c == b'%' {
            // A directive runs to the end of its line (or is an error).
            self.unroll_indent(-1);
            self.remove_simple_key();
            self.simple_key_allowed = false;
            while !self.is_breakz(0) {
                self.skip();
            }
            return Ok(());
        }
        if self.document_indicator() {
            self.unroll_indent(-1);
            self.remove_simple_key();
            self.simple_key_allowed = false;
            for _ in 0..3 {
                self.skip();
            }
            return Ok(());
        }
        match c {
            b'[' | b'{' => {
                self.save_simple_key();
                self.flow_level += 1;
                self.collection(self.line, self.column)?;
                self.simple_key_allowed = true;
                self.skip();
            }
            b']' | b'}' => {
                self.remove_simple_key();
                self.flow_level = self.flow_level.saturating_sub(1);
                self.simple_key_allowed = false;
                self.skip();
            }
            b',' => {
                self.remove_simple_key();
                self.simple_key_allowed = true;
                self.skip();
            }
            b'-' if self.is_blankz(1) => {
                self.roll_indent(self.line, self.column)?;
                self.remove_simple_key();
                self.simple_key_allowed = true;
                self.skip();
            }
            b'?' if flow || self.is_blankz(1) => {
                self.roll_indent(self.line, self.column)?;
                self.remove_simple_key();
                self.simple_key_allowed = !flow;
                self.skip();
            }
            b':' if flow || self.is_blankz(1) => self.fetch_value()?,
            b'*' | b'&' => {
                if c == b'*' {
                    self.value(self.line, self.column)?;
                }
                self.save_simple_key();
                self.simple_key_allowed = false;
                self.skip();
                while self.is_alpha(0) {
                    self.skip();
                }
            }
            b'!' => {
                self.save_simple_key();
                self.simple_key_allowed = false;
                self.scan_tag();
            }
            b'|' | b'>' if !flow => {
                self.value(self.line, self.column)?;
                self.remove_simple_key();
                self.simple_key_allowed = true;
                self.scan_block_scalar()?;
            }
            b'\'' | b'"' => {
                self.value(self.line, self.column)?;
                self.save_simple_key();
                self.simple_key_allowed = false;
                self.scan_flow_scalar(c == b'\'')?;
            }
            _ if self.starts_plain_scalar() => {
                self.value(self.line, self.column)?;
                self.save_simple_key();
                self.simple_key_allowed = false;
                self.scan_plain_scalar()?;
            }
            // "found character that cannot start any token"
            _ => return Err(Halt::Error),
        }
        Ok(())
    }

    fn starts_plain_scalar(&self) -> bool {
        let c = self.at(0);
        !(self.is_blankz(0) || b"-?:,[]{}#&*!|>'\"%@`".contains(&c))
            || (c == b'-' && !self.is_blank(1))
            || (self.flow_level == 0 && matches!(c, b'?' | b':') && !self.is_blankz(1))
    }

    fn scan_to_next_token(&mut self) {
        loop {
            if self.column == 0 && self.rest().starts_with("\u{feff}".as_bytes()) {
                self.skip();
            }
            while self.at(0) == b' '
                || ((self.flow_level > 0 || !self.simple_key_allowed) && self.at(0) == b'\t')
            {
                self.skip();
            }
            if self.at(0) == b'#' {
                while !self.is_breakz(0) {
                    self.skip();
                }
            }
            if !self.is_break(0) {
                return;
            }
            self.skip_line();
            if self.flow_level == 0 {
                self.simple_key_allowed = true;
            }
        }
    }

    fn stale_simple_keys(&mut self) {
        // A simple key must end on its own line, within 1024 bytes. (libyaml
        // stops with an error for a stale *required* key; going on is harmless.)
        if self.key.possible && (self.key.line < self.line || self.key.index + 1024 < self.pos) {
            self.key.possible = false;
        }
    }

    fn save_simple_key(&mut self) {
        // In a flow collection the key goes into that level's slot, which decides
        // nothing this scan needs.
        if self.simple_key_allowed && self.flow_level == 0 {
            self.key = Key {
                possible: true,
                index: self.pos,
                line: self.line,
                column: self.column,
            };
        }
    }

    fn remove_simple_key(&mut self) {
        if self.flow_level == 0 {
            self.key.possible = false;
        }
    }

    /// A block collection opens at `column` if it is deeper than the current one.
    fn roll_indent(&mut self, line: usize, column: usize) -> Result<(), Halt> {
        let column = column as isize;
        if self.flow_level == 0 && self.indent < column {
            self.indents.push(self.indent);
            self.indent = column;
            self.collection(line, column as usize)?;
        }
        Ok(())
    }

    fn unroll_indent(&mut self, column: isize) {
        if self.flow_level > 0 {
            return;
        }
        while self.indent > column {
            self.indent = self.indents.pop().unwrap_or(-1);
        }
    }

    fn fetch_value(&mut self) -> Result<(), Halt> {
        if self.flow_level > 0 {
            self.simple_key_allowed = false;
        } else if self.key.possible {
            // The key starts a block mapping at its own column.
            self.roll_indent(self.key.line, self.key.column)?;
            self.key.possible = false;
            self.simple_key_allowed = false;
        } else {
            self.roll_indent(self.line, self.column)?;
            self.simple_key_allowed = true;
        }
        self.skip();
        Ok(())
    }

    fn scan_tag(&mut self) {
        // A tag ends at a blank (or a `,` in a flow collection); anything else
        // after its characters is an error. Only the verbatim form `!<...>` may
        // hold a `,`.
        if self.at(1) == b'<' {
            self.skip();
            self.skip();
            while self.at(0) != b'>' && !self.is_blankz(0) {
                self.skip();
            }
            if self.at(0) == b'>' {
                self.skip();
            }
            return;
        }
        while !(self.is_blankz(0) || (self.flow_level > 0 && self.at(0) == b',')) {
            self.skip();
        }
    }

    fn scan_plain_scalar(&mut self) -> Result<(), Halt> {
        let indent = self.indent + 1;
        let mut leading_blanks = false;
        loop {
            if self.document_indicator() || self.at(0) == b'#' {
                break;
            }
            while !self.is_blankz(0) {
                let c = self.at(0);
                if self.flow_level > 0 && c == b':' && b",?[]{}".contains(&self.at(1)) {
                    // "found unexpected ':'"
                    return Err(Halt::Error);
                }
                if (c == b':' && self.is_blankz(1))
                    || (self.flow_level > 0 && b",[]{}".contains(&c))
                {
                    break;
                }
                leading_blanks = false;
                self.skip();
            }
            if !(self.is_blank(0) || self.is_break(0)) {
                break;
            }
            while self.is_blank(0) || self.is_break(0) {
                if self.is_blank(0) {
                    if leading_blanks && (self.column as isize) < indent && self.at(0) == b'\t' {
                        // "found a tab character that violates indentation"
                        return Err(Halt::Error);
                    }
                    self.skip();
                } else {
                    self.skip_line();
                    leading_blanks = true;
                }
            }
            if self.flow_level == 0 && (self.column as isize) < indent {
                break;
            }
        }
        if leading_blanks {
            self.simple_key_allowed = true;
        }
        Ok(())
    }

    fn scan_flow_scalar(&mut self, single: bool) -> Result<(), Halt> {
        let quote = if single { b'\'' } else { b'"' };
        self.skip();
        loop {
            if self.document_indicator() || self.is_z(0) {
                // "found unexpected document indicator" / "end of stream"
                return Err(Halt::Error);
            }
            while !self.is_blankz(0) {
                let c = self.at(0);
                if single && c == b'\'' && self.at(1) == b'\'' {
                    self.skip();
                    self.skip();
                } else if c == quote {
                    break;
                } else if !single && c == b'\\' && self.is_break(1) {
                    self.skip();
                    self.skip_line();
                    break;
                } else if !single && c == b'\\' {
                    let digits = match self.at(1) {
                        b'x' => 2,
                        b'u' => 4,
                        b'U' => 8,
                        b'0' | b'a' | b'b' | b't' | b'\t' | b'n' | b'v' | b'f' | b'r' | b'e'
                        | b' ' | b'"' | b'/' | b'\\' | b'N' | b'_' | b'L' | b'P' => 0,
                        // "found unknown escape character"
                        _ => return Err(Halt::Error),
                    };
                    self.skip();
                    self.skip();
                    for _ in 0..digits {
                        if !self.at(0).is_ascii_hexdigit() {
                            return Err(Halt::Error);
                        }
                        self.skip();
                    }
                } else {
                    self.skip();
                }
            }
            if self.at(0) == quote {
                break;
            }
            while self.is_blank(0) || self.is_break(0) {
                if self.is_blank(0) {
                    self.skip();
                } else {
                    self.skip_line();
                }
            }
        }
        self.skip();
        Ok(())
    }

    fn scan_block_scalar(&mut self) -> Result<(), Halt> {
        self.skip();
        let mut increment: isize = 0;
        let digit = |b: u8| -> Result<isize, Halt> {
            match b {
                // "found an indentation indicator equal to 0"
                b'0' => Err(Halt::Error),
                _ => Ok(isize::from(b - b'0')),
            }
        };
        if matches!(self.at(0), b'+' | b'-') {
            self.skip();
            if self.at(0).is_ascii_digit() {
                increment = digit(self.at(0))?;
                self.skip();
            }
        } else if self.at(0).is_ascii_digit() {
            increment = digit(self.at(0))?;
            self.skip();
            if matches!(self.at(0), b'+' | b'-') {
                self.skip();
            }
        }
        while self.is_blank(0) {
            self.skip();
        }
        if self.at(0) == b'#' {
            while !self.is_breakz(0) {
                self.skip();
            }
        }
        if !self.is_breakz(0) {
            // "did not find expected comment or line break"
            return Err(Halt::Error);
        }
        if self.is_break(0) {
            self.skip_line();
        }
        let mut indent: isize = 0;
        if increment != 0 {
            indent = if self.indent >= 0 {
                self.indent + increment
            } else {
                increment
            };
        }
        self.scan_block_scalar_breaks(&mut indent)?;
        while self.column as isize == indent && !self.is_z(0) {
            while !self.is_breakz(0) {
                self.skip();
            }
            if self.is_break(0) {
                self.skip_line();
            }
            self.scan_block_scalar_breaks(&mut indent)?;
        }
        Ok(())
    }

    /// Skips the empty lines and the indentation before a block scalar's next
    /// line; the first time, works out the scalar's indentation.
    fn scan_block_scalar_breaks(&mut self, indent: &mut isize) -> Result<(), Halt> {
        let mut max_indent: isize = 0;
        loop {
            while (*indent == 0 || (self.column as isize) < *indent) && self.at(0) == b' ' {
                self.skip();
            }
            max_indent = max_indent.max(self.column as isize);
            if (*indent == 0 || (self.column as isize) < *indent) && self.at(0) == b'\t' {
                // "found a tab character where an indentation space is expected"
                return Err(Halt::Error);
            }
            if !self.is_break(0) {
                break;
            }
            self.skip_line();
        }
        if *indent == 0 {
            *indent = max_indent.max(self.indent + 1).max(1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn deep_at(text: &str) -> Option<(usize, usize)> {
        match prescan(text, 32, usize::MAX) {
            Err(Refusal::TooDeep(at)) => Some((at.line, at.column)),
            Err(Refusal::TooMany(at)) => panic!("too many values at {at:?}"),
            Ok(()) => None,
        }
    }

    #[test]
    fn deep_flow_nesting_is_found_where_it_passes_the_bound() {
        assert_eq!(deep_at(&"[".repeat(100_000)), Some((1, 33)));
        assert_eq!(deep_at(&"{a: ".repeat(100_000)), Some((1, 4 * 32 + 1)));
        assert_eq!(deep_at(&"[\n".repeat(100_000)), Some((33, 1)));
        // Block nesting counts too: `- - - ...` opens a sequence per dash.
        assert_eq!(deep_at(&"- ".repeat(1000)), Some((1, 2 * 32 + 1)));
        assert_eq!(deep_at(&format!("{}]", "[".repeat(32))), None);
    }

    /// Closers libyaml reads as text must not count: each of these is 40 levels
    /// deep for libyaml, and a scan that took the `]` or `}` for closers (or a
    /// quote for the start of a string) would see almost none.
    #[test]
    fn closers_and_quotes_that_are_text_do_not_hide_depth() {
        let cases = [
            "[a, \"]]}\", ".repeat(40),
            "['it''s ]', ".repeat(40),
            "[\"\\\"]\", ".repeat(40),
            "[ # ]]]]\n".repeat(40),
            "[it's, ".repeat(40),
            "{k: a ]b, x: ".repeat(40).replace("]b", "b"),
            // A block scalar ends at a line indented less than its content:
            // the quote on its content line is text, `other` is a key.
            format!("- key: |\n     \"\n  other: {}", "[".repeat(40)),
            // A quote inside a plain scalar is text, not the start of a string.
            format!("a: x [ 'y\nb: {}\nc: '\n", "[".repeat(40)),
            format!("a: x #[ 'y\nb: {}\n", "[".repeat(40)),
            // A tag or an anchor before a collection is not part of it.
            format!("a: !t {}", "[".repeat(40)),
            format!("a: &x {}", "[&y ".repeat(40)),
        ];
        for text in cases {
            assert!(deep_at(&text).is_some(), "not found deep: {text:?}");
        }
    }

    /// Brackets in scalars and comments are text: files full of them are shallow.
    #[test]
    fn brackets_that_are_text_do_not_count() {
        let cases = [
            format!("run: |\n{}", "  [[[[ {{{{ \"'\n".repeat(40)),
            format!("run: >-\n{}", "  [[[[ {{{{\n\n".repeat(40)),
            format!("k: a\n{}", "  [[[[ {{{{ '\"\n".repeat(40)),
            format!("k: \"{}\"\n", "[[[[ {{{{ '".repeat(40)),
            format!("k: '{}'\n", "[[[[ {{{{ \"".repeat(40)),
            format!("k: \"a\n{}\"\n", "  [[[[ {{{{\n".repeat(40)),
            format!("{}k: v\n", "# [[[[ {{{{\n".repeat(40)),
            format!("k: v # {}\n", "[".repeat(400)),
            format!(
                "steps:\n{}",
                "  - command: echo [a] {b} ${C} '[' \"{\" [[ $x ]]\n".repeat(400)
            ),
        ];
        for text in &cases {
            assert_eq!(deep_at(text), None, "{text:?}");
            // At most a mapping, a sequence and a mapping in it.
            assert!(depths(text).total <= 3, "{:?}", depths(text));
        }
    }

    #[test]
    fn the_depth_is_libyamls_past_serde_yamls_recursion_limit() {
        let text = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let err = serde_yaml::from_str::<serde_yaml::Value>(&text).unwrap_err();
        assert!(err.to_string().contains("recursion limit"), "{err}");
        assert_eq!(
            depths(&text),
            Depths {
                flow: 200,
                total: 200
            }
        );
    }

    #[test]
    fn what_the_reader_refuses_ends_the_scan() {
        let text = format!("a: b\n\u{1}{}", "[".repeat(100));
        assert_eq!(deep_at(&text), None);
        let text = format!("\u{feff}a: {}", "[".repeat(100));
        assert_eq!(deep_at(&text), Some((1, 4 + 32 - 1)));
    }

    // A differential test against serde_yaml: random trees rendered as YAML in
    // every style this scan has rules for (block and flow collections; plain,
    // multi-line plain, quoted, multi-line quoted and literal scalars; comments
    // everywhere, holding brackets and quotes), parsed by serde_yaml to check
    // the text means the tree, then scanned: the flow depth must be exact.

    #[derive(Clone, Debug)]
    enum Scalar {
        Plain(String),
        /// Words written on several lines (a multi-line plain scalar).
        Lines(Vec<String>),
        Single(String),
        Double(String),
        /// A double-quoted scalar broken over lines.
        DoubleLines(Vec<String>),
        Literal(Vec<String>),
    }

    #[derive(Clone, Debug)]
    enum Node {
        Scalar(Scalar),
        /// `true`: flow style.
        Seq(bool, Vec<Node>),
        Map(bool, Vec<Node>),
    }

    #[derive(Debug, PartialEq)]
    enum Shape {
        Scalar,
        Seq(Vec<Shape>),
        Map(Vec<Shape>),
    }

    fn shape_of_node(node: &Node) -> Shape {
        match node {
            Node::Scalar(_) => Shape::Scalar,
            Node::Seq(_, items) => Shape::Seq(items.iter().map(shape_of_node).collect()),
            Node::Map(_, items) => Shape::Map(items.iter().map(shape_of_node).collect()),
        }
    }

    fn shape_of_value(value: &serde_yaml::Value) -> Shape {
        match value {
            serde_yaml::Value::Sequence(items) => {
                Shape::Seq(items.iter().map(shape_of_value).collect())
            }
            serde_yaml::Value::Mapping(map) => {
                Shape::Map(map.values().map(shape_of_value).collect())
            }
            _ => Shape::Scalar,
        }
    }

    /// Plain text for the block context: no `: `, no ` #`, starting with a letter.
    fn block_plain() -> impl Strategy<Value = String> {
        "[a-z][a-z\\[\\]{}'\"#,?\\- ]{0,7}"
            .prop_map(|s| s.replace(" #", " x").trim_end().to_string())
    }

    fn quoted() -> impl Strategy<Value = String> {
        "[a-z\\[\\]{}'\"#,:?|>&*!%@`\\\\\\- ]{0,8}"
    }

    fn literal_line() -> impl Strategy<Value = String> {
        "[a-z\\[\\]{}'\"#:,?|>&*!%@`\\- ]{0,9}".prop_map(|s| {
            if s.starts_with(' ') {
                format!("x{s}")
            } else {
                s
            }
        })
    }

    fn node() -> impl Strategy<Value = Node> {
        let scalar = prop_oneof![
            block_plain().prop_map(Scalar::Plain),
            proptest::collection::vec(block_plain(), 2..4).prop_map(Scalar::Lines),
            quoted().prop_map(Scalar::Single),
            quoted().prop_map(Scalar::Double),
            proptest::collection::vec(quoted(), 2..4).prop_map(Scalar::DoubleLines),
            proptest::collection::vec(literal_line(), 1..4).prop_map(Scalar::Literal),
        ];
        scalar
            .prop_map(Node::Scalar)
            .prop_recursive(6, 64, 4, |inner| {
                prop_oneof![
                    (
                        any::<bool>(),
                        proptest::collection::vec(inner.clone(), 0..4)
                    )
                        .prop_map(|(flow, items)| Node::Seq(flow, items)),
                    (any::<bool>(), proptest::collection::vec(inner, 0..4))
                        .prop_map(|(flow, items)| Node::Map(flow, items)),
                ]
            })
    }

    fn root() -> impl Strategy<Value = Node> {
        (any::<bool>(), proptest::collection::vec(node(), 1..5)).prop_map(|(seq, items)| {
            if seq {
                Node::Seq(false, items)
            } else {
                Node::Map(false, items)
            }
        })
    }

    struct Render {
        out: String,
        comments: bool,
        flow_depth: usize,
    }

    fn key(i: usize) -> String {
        match i % 3 {
            0 => format!("k{i}"),
            1 => format!("\"k{i} [{{#\""),
            _ => format!("'k{i} ]}}'"),
        }
    }

    fn escape_double(s: &str) -> String {
        s.replace('\\', "\\\\").replace('"', "\\\"")
    }

    fn double(s: &str) -> String {
        format!("\"{}\"", escape_double(s))
    }

    fn single(s: &str) -> String {
        format!("'{}'", s.replace('\'', "''"))
    }

    impl Render {
        /// A node inside a flow collection at `depth`; `col` is where continuation
        /// lines are indented.
        fn flow(&mut self, node: &Node, depth: usize, col: usize) {
            match node {
                Node::Scalar(s) => {
                    let text = match s {
                        Scalar::Plain(p) => {
                            let p: String = p.chars().filter(|c| !"[]{},".contains(*c)).collect();
                            let p = p.replace(" #", " x").trim_end().to_string();
                            if p.is_empty() { "x".to_string() } else { p }
                        }
                        Scalar::Single(q) => single(q),
                        Scalar::Lines(w) | Scalar::DoubleLines(w) | Scalar::Literal(w) => {
                            double(&w.join(" "))
                        }
                        Scalar::Double(q) => double(q),
                    };
                    self.out.push_str(&text);
                }
                Node::Seq(_, items) | Node::Map(_, items) => {
                    let map = matches!(node, Node::Map(..));
                    self.flow_depth = self.flow_depth.max(depth + 1);
                    self.out.push(if map { '{' } else { '[' });
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            self.out.push(',');
                            if self.comments && !i.is_multiple_of(2) {
                                self.out.push_str(" # ] } ' \" [\n");
                                self.out.push_str(&" ".repeat(col + 4));
                            } else {
                                self.out.push(' ');
                            }
                        }
                        if map {
                            self.out.push_str(&key(i));
                            self.out.push_str(": ");
                        }
                        self.flow(item, depth + 1, col);
                    }
                    self.out.push(if map { '}' } else { ']' });
                }
            }
        }

        fn comment(&mut self, i: usize) {
            if self.comments && i.is_multiple_of(2) {
                self.out.push_str(" # [ { ' \"");
            }
        }

        /// A node after `key: ` or `- `, whose indicator is at column `col`.
        fn block(&mut self, node: &Node, col: usize, i: usize) {
            let inner = " ".repeat(col + 2);
            match node {
                Node::Scalar(Scalar::Plain(p)) => {
                    self.out.push_str(p);
                    self.comment(i);
                }
                Node::Scalar(Scalar::Lines(words)) => {
                    self.out.push_str(&words[0]);
                    for w in &words[1..] {
                        self.out.push('\n');
                        self.out.push_str(&inner);
                        self.out.push_str(w);
                    }
                    self.comment(i);
                }
                Node::Scalar(Scalar::Single(q)) => {
                    self.out.push_str(&single(q));
                    self.comment(i);
                }
                Node::Scalar(Scalar::Double(q)) => {
                    self.out.push_str(&double(q));
                    self.comment(i);
                }
                Node::Scalar(Scalar::DoubleLines(parts)) => {
                    let parts: Vec<String> =
                        parts.iter().map(|p| escape_double(p.trim())).collect();
                    self.out.push('"');
                    self.out.push_str(&parts.join(&format!("\n{inner}")));
                    self.out.push('"');
                    self.comment(i);
                }
                Node::Scalar(Scalar::Literal(lines)) => {
                    self.out.push('|');
                    self.comment(i);
                    for line in lines {
                        self.out.push('\n');
                        self.out.push_str(&inner);
                        self.out.push_str(line);
                    }
                }
                Node::Seq(flow, items) | Node::Map(flow, items) => {
                    if *flow || items.is_empty() {
                        self.flow(node, 0, col);
                        self.comment(i);
                    } else {
                        self.entries(node, col + 2);
                        return;
                    }
                }
            }
            self.out.push('\n');
        }

        /// The entries of a block collection, each at column `col`, on lines of
        /// their own (the current line is ended first).
        fn entries(&mut self, node: &Node, col: usize) {
            if !self.out.is_empty() && !self.out.ends_with('\n') {
                self.out.push('\n');
            }
            let (map, items) = match node {
                Node::Map(_, items) => (true, items),
                Node::Seq(_, items) => (false, items),
                Node::Scalar(_) => unreachable!("only collections have entries"),
            };
            let pad = " ".repeat(col);
            for (i, item) in items.iter().enumerate() {
                if self.comments && !i.is_multiple_of(2) {
                    self.out.push_str(&pad);
                    self.out.push_str("# ] } ' \" [[\n");
                }
                self.out.push_str(&pad);
                if map {
                    self.out.push_str(&key(i));
                    self.out.push_str(": ");
                } else {
                    self.out.push_str("- ");
                }
                self.block(item, col, i);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn the_scan_finds_the_flow_depth_serde_yaml_parses(root in root(), comments in any::<bool>()) {
            let mut r = Render { out: String::new(), comments, flow_depth: 0 };
            r.entries(&root, 0);
            let text = r.out;
            let value: serde_yaml::Value = serde_yaml::from_str(&text)
                .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert_eq!(shape_of_value(&value), shape_of_node(&root), "{}", text);
            let found = depths(&text);
            prop_assert_eq!(found.flow, r.flow_depth, "{}", text);
            prop_assert!(found.total >= found.flow);
        }

        #[test]
        fn any_text_is_scanned_without_panicking(text in "[\\[\\]{}:,?'\"#|>&*!%\\\\\\- a\n\t\r]{0,64}") {
            let _ = depths(&text);
        }
    }
}
