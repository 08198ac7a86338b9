//! The engine's size limits against what they protect. A step's command and
//! environment are capped by the engine (`reel_engine::model::spec`), which does
//! not depend on the agent; the agent caps each protocol message. This crate sees
//! both, so it checks here that a step the engine accepts always fits in the
//! message that carries it to the agent, with room for what runners add.

use std::collections::BTreeMap;

use reel_agent::proto::{MAX_PAYLOAD, Message, encode_frame};
use reel_engine::model::spec::{
    JobSpec, MAX_EXEC_STRING, MAX_STEP_BYTES, StepSpec, command_exec_size, variable_exec_size,
};

/// The room `MAX_STEP_BYTES` leaves under the agent's cap for what is added at
/// run time: secret values, `PATH`, `HOME`, `CI`, `REEL_JOB_ID`, the argv and the
/// message's own encoding (documented with `MAX_STEP_BYTES`).
const RUNNER_ROOM: usize = 256 * 1024;

// Checked when this crate compiles: `cargo test -p reel-tests` fails if the
// agent's cap ever drops below the engine's step limit plus the runner room.
const _: () = assert!(
    MAX_STEP_BYTES + RUNNER_ROOM <= MAX_PAYLOAD,
    "the agent's messages carry less than the engine's step limit plus the runner room: \
     lower MAX_STEP_BYTES in reel_engine::model::spec"
);

/// A step with `vars` variables named in `name_len` digits with `value_len`
/// bytes each, topped up to exactly `MAX_STEP_BYTES` with the longest variables
/// and a command.
fn step_at_the_limit(vars: usize, name_len: usize, value_len: usize) -> JobSpec {
    let mut environment: BTreeMap<String, String> = (0..vars)
        .map(|i| (format!("{i:0name_len$}"), "v".repeat(value_len)))
        .collect();
    let used = |env: &BTreeMap<String, String>| -> usize {
        env.iter().map(|(k, v)| variable_exec_size(k, v)).sum()
    };
    let mut fillers = 0;
    while MAX_STEP_BYTES - used(&environment) > MAX_EXEC_STRING {
        let name = format!("FILL{fillers}");
        let value = "f".repeat(MAX_EXEC_STRING - name.len() - 2);
        environment.insert(name, value);
        fillers += 1;
    }
    let command = "c".repeat(MAX_STEP_BYTES - used(&environment) - 1);
    assert_eq!(
        command_exec_size(&command) + used(&environment),
        MAX_STEP_BYTES
    );
    JobSpec {
        name: "limit".into(),
        runner: "process".into(),
        steps: vec![StepSpec {
            name: "at the limit".into(),
            command,
            environment,
            timeout_ms: None,
        }],
        ..JobSpec::default()
    }
}

/// Steps exactly at the limit, shaped to cost the most in the agent's encoding
/// (many short variables, each with its own length prefixes; long ones, with the
/// widest prefixes), encode as one `ExecStart` with what the process runner adds
/// and two secrets filling most of the room.
#[test]
fn a_step_at_the_limit_fits_one_agent_message_with_the_runner_additions() {
    let shapes = [
        (20_000, 6, 0),
        (3_000, 251, 0),
        (5, 8, MAX_EXEC_STRING - 8 - 2 - 1),
    ];
    for (vars, name_len, value_len) in shapes {
        let spec = step_at_the_limit(vars, name_len, value_len);
        assert_eq!(spec.check_size(), Ok(()), "{vars} variables");
        let step = &spec.steps[0];
        let mut env = step.environment.clone();
        let long_path = format!("/{}", "p".repeat(4095));
        env.insert("HOME".into(), long_path.clone());
        env.insert("PATH".into(), long_path);
        env.insert("CI".into(), "true".into());
        env.insert("REEL_JOB_ID".into(), u64::MAX.to_string());
        for secret in ["SECRET_A", "SECRET_B"] {
            env.insert(secret.into(), "s".repeat(110 * 1024));
        }
        let message = Message::ExecStart {
            exec_id: u64::MAX,
            argv: vec!["sh".into(), "-c".into(), step.command.clone()],
            env: env.into_iter().collect(),
            cwd: None,
            timeout_ms: u64::MAX,
        };
        let frame = encode_frame(&message).unwrap_or_else(|e| {
            panic!("a step at the engine's limit ({vars} variables) does not fit: {e}")
        });
        assert!(frame.len() > MAX_STEP_BYTES);
    }
}
