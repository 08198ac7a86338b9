//! The SDK's conformance kit against the process runner (with the real agent).

mod common;

use reel_plugin_sdk::conformance::Suite;
use reel_runner_process::ProcessRunner;

#[test]
fn conforms() {
    let root = tempfile::tempdir().unwrap();
    let suite = Suite::default();
    let sandbox_id = suite.job.sandbox_id;
    let config = common::config(root.path(), sandbox_id);
    let report = suite
        .run_new::<ProcessRunner>(&config)
        .unwrap_or_else(|v| panic!("{v}"));
    assert!(report.passed.contains(&"malformed handle"), "{report:?}");
    // Through a second instance: the step refused mid-way is taken back.
    assert!(report.passed.contains(&"recovery"), "{report:?}");
    assert_eq!(report.skipped, [], "{report:?}");
    common::assert_nothing_left(root.path(), sandbox_id, None);
    common::remove_cgroup_parent(sandbox_id);
}
