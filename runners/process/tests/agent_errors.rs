//! The runner decides on the agent's error codes, never on their text: a scripted
//! agent on the job's socket answers `ExecStart` with an error, and the runner
//! resumes the step only when the code says the agent already has it.

mod common;

use std::os::unix::net::UnixListener;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{Fixture, Output, job, step};
use reel_agent::proto::{self, ErrorCode, FrameReader, Message, ProtoError, Role, Stream};
use reel_plugin_sdk::{ExecResult, Handle, Runner, RunnerError};
use reel_runner_process::ProcessRunner;

/// Stands in for the agent: answers `Hello` with `version` and `Init`, refuses
/// `ExecStart` with `refusal`, serves a `Resume` from 0 with `resumed\n` and the exit,
/// and returns every message the host sent once it hangs up.
fn scripted_agent(
    listener: UnixListener,
    version: u16,
    refusal: Message,
) -> JoinHandle<Vec<Message>> {
    thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut frames = FrameReader::new();
        let mut got = Vec::new();
        loop {
            let msg = match frames.read_message(&mut stream) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(ProtoError::Closed | ProtoError::Io(_)) => return got,
                Err(e) => panic!("the runner sent a bad frame: {e}"),
            };
            let answers = match &msg {
                Message::Hello { .. } => vec![Message::Hello {
                    min_version: version,
                    max_version: version,
                    role: Role::Agent,
                }],
                Message::Init { job_id, .. } => vec![Message::Initialized {
                    job_id: job_id.clone(),
                }],
                Message::ExecStart { .. } => vec![refusal.clone()],
                Message::Resume {
                    exec_id,
                    from_offset: 0,
                } => vec![
                    Message::Output {
                        exec_id: *exec_id,
                        stream: Stream::Stdout,
                        offset: 0,
                        bytes: b"resumed\n".to_vec(),
                    },
                    Message::ExecExit {
                        exec_id: *exec_id,
                        code: Some(0),
                        signal: None,
                        timed_out: false,
                        total_bytes: 8,
                    },
                ],
                _ => vec![],
            };
            got.push(msg);
            for a in answers {
                proto::write_message(&mut stream, &a).unwrap();
            }
        }
    })
}

/// Prepares job `sandbox_id`, puts the scripted agent on its socket, connects and runs
/// step 1; returns the step's result and output and what the agent was sent.
fn exec_against(
    sandbox_id: u32,
    version: u16,
    refusal: Message,
) -> (Result<ExecResult, RunnerError>, Output, Vec<Message>) {
    let root = tempfile::tempdir().unwrap();
    let runner = ProcessRunner::new(&common::config(root.path(), sandbox_id)).unwrap();
    let plan = runner.plan(&job(sandbox_id)).unwrap();
    let prepared: Handle = runner.prepare(&plan).unwrap();
    let socket = root.path().join(format!("{sandbox_id}/agent.sock"));
    let agent = scripted_agent(UnixListener::bind(&socket).unwrap(), version, refusal);
    let handle = runner.connect(&prepared).unwrap();
    let mut out = Output::default();
    let result = runner.exec(&handle, &step(1, "never run"), &mut out);
    // Cleanup drops the connection, which ends the scripted agent.
    runner.cleanup(&handle).unwrap();
    common::remove_cgroup_parent(sandbox_id);
    let sent = agent.join().unwrap();
    (result, out, sent)
}

fn resumed(sent: &[Message]) -> bool {
    sent.iter().any(|m| {
        matches!(
            m,
            Message::Resume {
                exec_id: 1,
                from_offset: 0
            }
        )
    })
}

#[test]
fn exec_exists_resumes_the_step_whatever_the_text_says() {
    let refusal = Message::Failure {
        exec_id: Some(1),
        code: ErrorCode::ExecExists,
        message: "Step 1 is running already (the wording is free).".into(),
    };
    let (result, out, sent) = exec_against(120, 2, refusal);
    let result = result.unwrap();
    assert!(result.success(), "{result:?}");
    assert_eq!(out.stdout, b"resumed\n");
    assert!(out.gaps.is_empty(), "{:?}", out.gaps);
    assert!(resumed(&sent), "{sent:?}");
}

#[test]
fn another_code_fails_the_step_even_with_the_old_text() {
    let refusal = Message::Failure {
        exec_id: Some(1),
        code: ErrorCode::SpawnFailed,
        message: "Exec 1 already exists.".into(),
    };
    let (result, out, sent) = exec_against(121, 2, refusal);
    let err = result.unwrap_err();
    assert!(err.message.contains("Exec 1 already exists."), "{err}");
    assert!(!resumed(&sent), "{sent:?}");
    assert!(out.combined.is_empty());
}

#[test]
fn a_version_1_error_without_a_code_fails_the_step() {
    let refusal = Message::Error {
        exec_id: Some(1),
        message: "Exec 1 already exists.".into(),
    };
    let (result, _, sent) = exec_against(122, 1, refusal);
    let err = result.unwrap_err();
    assert!(err.message.contains("Exec 1 already exists."), "{err}");
    assert!(!resumed(&sent), "{sent:?}");
}

#[test]
fn a_step_re_sent_to_the_real_agent_is_followed_from_the_start() {
    let f = Fixture::new(123);
    let s = step(5, "echo one; sleep 0.5; echo two");
    thread::scope(|scope| {
        // The first engine starts the step and stores nothing before it "dies".
        let first = scope.spawn(|| f.runner.exec(&f.handle, &s, &mut Output::default()));
        thread::sleep(Duration::from_millis(200));
        let engine2 = f.new_runner();
        let handle2 = engine2.reattach(&f.handle).unwrap();
        // With nothing stored the step is sent as new; the agent answers ExecExists.
        let mut out = Output::default();
        let result = engine2.exec(&handle2, &s, &mut out).unwrap();
        assert!(result.success(), "{result:?}");
        assert_eq!(out.stdout, b"one\ntwo\n");
        assert!(out.gaps.is_empty(), "{:?}", out.gaps);
        assert!(
            first.join().unwrap().is_err(),
            "the replaced connection's exec"
        );
        engine2.cleanup(&handle2).unwrap();
    });
}
