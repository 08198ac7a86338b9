//! The template passes the SDK's conformance kit in-process.

use reel_plugin_sdk::RunnerConfig;
use reel_plugin_sdk::conformance::Suite;
use reel_runner_template::TemplateRunner;

#[test]
fn template_conforms() {
    let root = tempfile::tempdir().unwrap();
    let config = RunnerConfig {
        sandbox_root: root.path().to_owned(),
        ..RunnerConfig::default()
    };
    let report = Suite::default()
        .run_new::<TemplateRunner>(&config)
        .unwrap_or_else(|v| panic!("{v}"));
    assert!(report.passed.contains(&"cleanup"), "{report:?}");
}
