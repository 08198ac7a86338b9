//! Isolation between a job and the host, end to end: what a step does to escape
//! its sandbox does not outlive the job, and the job still ends.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reel_tests::{
    assert_nothing_left, events, processes_under, reel, root_tag, target_dir, text, workspace_root,
};

const TERMINALS: [&str; 5] = ["Succeeded", "Failed", "Cancelled", "TimedOut", "Lost"];

/// A step that moves itself two levels down into child cgroups of its own, in
/// every hierarchy the job has a cgroup in (v1: `/proc/self/cgroup` names each
/// controller's mount; v2: the `0::` line, under `/sys/fs/cgroup`), then leaves a
/// `sleep` in a session of its own there: found neither in the job's cgroup
/// directories nor in the agent's session.
const ESCAPE: &str = r#"name: escape
steps:
  - name: escape into a child cgroup
    command: |
      grep sbx- /proc/self/cgroup | while IFS=: read -r id controllers path; do
        if [ -n "$controllers" ]; then
          dir=/sys/fs/cgroup/${controllers#name=}$path
        else
          dir=/sys/fs/cgroup$path
        fi
        mkdir -p "$dir/escape/deeper" && echo $$ > "$dir/escape/deeper/cgroup.procs" &&
          echo "moved into $dir/escape/deeper"
      done
      setsid sleep 300 >/dev/null 2>&1 &
      echo "left $!"
"#;

#[test]
fn a_step_that_escapes_into_a_child_cgroup_is_killed_and_the_job_ends() {
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let job = files.path().join("escape.yml");
    std::fs::write(&job, ESCAPE).unwrap();
    let out = reel(state.path(), &["run", job.to_str().unwrap()], &[]);
    let stdout = text(&out.stdout);
    let left: i32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("left "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("the step did not start its sleep: {stdout}"));
    // Whatever the outcome, do not leave the sleep behind for the next test run.
    let root = state.path().join("sandboxes");
    let survived = processes_under(&root).contains(&(left as u32));
    if survived {
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(left).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
    }
    assert!(
        stdout.contains("moved into "),
        "the step never left the job's cgroup, so this proves nothing: {stdout}"
    );
    assert!(out.status.success(), "{stdout} / {}", text(&out.stderr));
    assert!(!survived, "the escaped sleep (pid {left}) outlived the job");
    let names = events(state.path(), 1);
    let terminals: Vec<&String> = names
        .iter()
        .filter(|n| TERMINALS.contains(&n.as_str()))
        .collect();
    assert_eq!(terminals, ["Succeeded"], "{names:?}");
    assert_nothing_left(state.path(), "escape");
    // `assert_nothing_left` knows the memory and pids hierarchies; the freezer's too.
    let tag = format!("sbx-{}-", root_tag(&std::path::absolute(&root).unwrap()));
    let freezer: Vec<_> = std::fs::read_dir(Path::new("/sys/fs/cgroup/freezer/reel"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&tag))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    assert!(freezer.is_empty(), "freezer cgroups remain: {freezer:?}");
}

/// Starts `argv` with the pid `pid`, as pid reuse would give it, by setting the
/// pid namespace's last allocated pid (`/proc/sys/kernel/ns_last_pid`, root
/// only) just below it. Other processes of the host fork too, so it retries.
fn spawn_with_pid(pid: u32, argv: &[&str]) -> Child {
    for _ in 0..500 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("cannot write /proc/sys/kernel/ns_last_pid (these tests run as root)");
        let mut child = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        if child.id() == pid {
            return child;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not start {argv:?} with pid {pid}");
}

/// The first step ends; its pid, which is its process group's id, is then given
/// to an unrelated process in a session of its own (as pid reuse would, forced
/// through `ns_last_pid`) while the job runs its second step. The job ends and
/// that process is untouched.
#[test]
fn a_process_that_reuses_a_finished_steps_group_id_outlives_the_job() {
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let go = files.path().join("go");
    let job = files.path().join("reuse.yml");
    std::fs::write(
        &job,
        format!(
            "name: reuse\nsteps:\n  - name: finish\n    command: echo \"leader $$\"\n  \
             - name: wait\n    command: while [ ! -e {} ]; do sleep 0.02; done\n",
            go.display()
        ),
    )
    .unwrap();
    let mut run = Command::new(target_dir().join("reel"))
        .arg("--state-dir")
        .arg(state.path())
        .arg("run")
        .arg(&job)
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(run.stdout.take().unwrap()).lines();
    let leader: u32 = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("leader ")
                .and_then(|p| p.trim().parse().ok())
        })
        .expect("the first step printed no pid");
    // Once the agent has reaped the first step, its pid is free.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{leader}")).exists() {
        assert!(Instant::now() < deadline, "the first step never ended");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut stranger = spawn_with_pid(leader, &["setsid", "sleep", "300"]);
    std::fs::write(&go, "").unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = run.wait().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let spared = stranger.try_wait().unwrap().is_none();
    let _ = stranger.kill();
    let _ = stranger.wait();
    assert!(status.success(), "{rest:?}");
    assert!(
        spared,
        "the job's teardown killed an unrelated process holding a finished step's group id"
    );
    let names = events(state.path(), 1);
    assert_eq!(names.last().map(String::as_str), Some("Succeeded"));
    assert_nothing_left(state.path(), "reuse");
}
