//! The web view (`docs/web.md`): one HTML page, its script and its style,
//! embedded in the binary and served by `reel serve` — no build step, nothing
//! fetched from anywhere at run time.
//!
//! The page is the same for every URL it answers (`/` is the jobs page,
//! `/jobs/{id}` a job's); its script reads the path and draws the view from
//! the API (`docs/api.md`), with the bearer token the user signed in with.
//! These bytes say nothing about any job, so they are served without a token
//! ([`is_public`]); every call that reads or changes a job is token-checked.

use hyper::StatusCode;
use hyper::header::{CACHE_CONTROL, HeaderName, HeaderValue};

use crate::http::{self, Response};

const INDEX: &str = include_str!("../web/index.html");
const SCRIPT: &str = include_str!("../web/app.js");
const STYLE: &str = include_str!("../web/app.css");

/// The page may load only itself: its own script and style, and calls to the
/// API on the same origin. No inline script, no frames, no other origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
                   form-action 'self'; frame-ancestors 'none'";

/// What a path of the web view serves, if it is one.
fn asset(parts: &[&str]) -> Option<(&'static str, &'static str)> {
    match parts {
        [] => Some(("text/html; charset=utf-8", INDEX)),
        ["jobs", id] if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => {
            Some(("text/html; charset=utf-8", INDEX))
        }
        ["ui", "app.js"] => Some(("text/javascript; charset=utf-8", SCRIPT)),
        ["ui", "app.css"] => Some(("text/css; charset=utf-8", STYLE)),
        _ => None,
    }
}

/// Whether `path` (as requested, before any trimming) is a page or asset of
/// the web view.
pub fn is_public(path: &str) -> bool {
    asset(&http::segments(path)).is_some()
}

/// Whether the path's segments (as the router splits them) name a page or an
/// asset of the web view.
pub fn is_page(parts: &[&str]) -> bool {
    asset(parts).is_some()
}

/// The page or asset at `parts` ([`is_page`] said yes).
pub fn page(parts: &[&str]) -> Response {
    let Some((content_type, body)) = asset(parts) else {
        return http::error(StatusCode::NOT_FOUND, "no such page");
    };
    let mut response = http::bytes(StatusCode::OK, content_type, body);
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CSP),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
    ] {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    // A new binary serves a new script: a browser asks again each load.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pages_and_assets_are_public_and_nothing_else() {
        for p in ["/", "/jobs/12", "/jobs/12/", "/ui/app.js", "/ui/app.css"] {
            assert!(is_public(p), "{p}");
        }
        for p in [
            "/v1/jobs",
            "/jobs/",
            "/jobs/x",
            "/jobs/1/logs",
            "/ui/",
            "/ui/other.js",
            "/metrics",
            "/ui/../v1/jobs",
        ] {
            assert!(!is_public(p), "{p}");
        }
    }

    #[test]
    fn a_page_has_its_type_and_a_strict_policy() {
        let r = page(&["jobs", "3"]);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            "text/html; charset=utf-8"
        );
        assert!(
            r.headers()["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("script-src 'self'")
        );
        assert_eq!(
            page(&["ui", "app.js"]).headers()["content-type"],
            "text/javascript; charset=utf-8"
        );
    }
}
