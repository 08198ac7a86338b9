//! Test support that ships in the library: the `REEL_TEST_CRASH_AT` crash
//! points ([`crashpoint`], checked on every append of the real binary, so the
//! crash matrix can kill the engine it ships) and scripted lifecycles appended
//! without running anything ([`simulate`], for tests, benches and examples).

pub mod crashpoint;
pub mod simulate;
