//! Out of memory as the cause of a step's failure.

use reel_plugin_sdk::{ExecResult, RunnerError};

/// The notice kind `exec` raises when a step failed for lack of memory.
pub const OOM_NOTICE: &str = "out-of-memory";

/// A step that failed while the kernel's OOM killer ended processes of the job's
/// memory cgroup (its count rose from `before` to `after`) fails with that cause:
/// the exit code 137 or signal 9 it leaves behind says nothing of memory.
/// `ExecResult` has no field for a cause, so the cause travels as the step's
/// error, which the engine records as the job's reason (the exit status is kept in
/// the message); a notice of kind [`OOM_NOTICE`], raised on the exec's thread,
/// puts it on the job's record too. A step that succeeded although one of its
/// processes was killed is left as it is. `memory_bytes` is the job's limit (0:
/// none).
pub fn with_oom_cause(
    memory_bytes: u64,
    before: Option<u64>,
    after: Option<u64>,
    result: Result<ExecResult, RunnerError>,
) -> Result<ExecResult, RunnerError> {
    let Some(ended) = how_it_ended(&result) else {
        return result;
    };
    let (Some(before), Some(after)) = (before, after) else {
        return result;
    };
    if after <= before {
        return result;
    }
    Err(out_of_memory(
        &memory_limit(memory_bytes),
        "the kernel's",
        after - before,
        " of the job",
        &ended,
    ))
}

/// How a step that did not succeed ended, for a cause's message; `None` for a
/// step that succeeded or timed out (a timeout is its own cause).
pub fn how_it_ended(result: &Result<ExecResult, RunnerError>) -> Option<String> {
    Some(match result {
        Ok(r) if r.success() || r.timed_out => return None,
        Ok(r) => match (r.exit_code, r.signal) {
            (_, Some(signal)) => format!("the step was killed by signal {signal}"),
            (Some(code), None) => format!("the step exited with code {code}"),
            (None, None) => "the step ended without an exit status".to_owned(),
        },
        Err(e) => format!("then {e}"),
    })
}

/// The step's error for an out-of-memory end, with its notice raised: `out of
/// memory (<limit>): <killer> OOM killer ended <n> process(es)<whose>; <ended>`.
pub fn out_of_memory(
    limit: &str,
    killer: &str,
    killed: u64,
    whose: &str,
    ended: &str,
) -> RunnerError {
    let message = format!(
        "out of memory ({limit}): {killer} OOM killer ended {killed} process{}{whose}; {ended}",
        if killed == 1 { "" } else { "es" },
    );
    reel_plugin_sdk::host::notice(OOM_NOTICE, &message);
    RunnerError::failed(message)
}

/// `limit 64 MiB`, `limit 2 GiB`, or that there was none (the host ran out).
pub fn memory_limit(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    match bytes {
        0 => "no limit set: the host ran out".to_owned(),
        b if b % GIB == 0 => format!("limit {} GiB", b / GIB),
        b if b % MIB == 0 => format!("limit {} MiB", b / MIB),
        b => format!("limit {b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_limit_is_said_in_the_largest_whole_unit() {
        assert_eq!(memory_limit(64 << 20), "limit 64 MiB");
        assert_eq!(memory_limit(2 << 30), "limit 2 GiB");
        assert_eq!(memory_limit(1536 << 20), "limit 1536 MiB");
        assert_eq!(memory_limit(1000), "limit 1000 bytes");
        assert_eq!(memory_limit(0), "no limit set: the host ran out");
    }

    #[test]
    fn only_a_failure_while_the_oom_count_rose_is_out_of_memory() {
        let failed = || {
            Ok(ExecResult {
                exit_code: Some(137),
                ..ExecResult::default()
            })
        };
        assert!(with_oom_cause(64 << 20, Some(0), Some(0), failed()).is_ok());
        assert!(with_oom_cause(64 << 20, None, Some(1), failed()).is_ok());
        let ok = Ok(ExecResult {
            exit_code: Some(0),
            ..ExecResult::default()
        });
        assert!(with_oom_cause(64 << 20, Some(0), Some(1), ok).is_ok());
        let err = with_oom_cause(64 << 20, Some(1), Some(3), failed()).unwrap_err();
        assert!(
            err.message.starts_with(
                "out of memory (limit 64 MiB): the kernel's OOM killer ended 2 processes"
            ),
            "{}",
            err.message
        );
        assert!(err.message.ends_with("the step exited with code 137"));
    }
}
