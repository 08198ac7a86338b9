//! The client's follow loop against a scripted agent: merging, acknowledgements,
//! offsets, and which error kinds a negotiated version may carry.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use reel_agent::proto::{self, ErrorCode, FrameReader, Message, ProtoError, Role, Stream};
use reel_agent::{AgentClient, ClientError};

const T: Duration = Duration::from_secs(10);
/// Long enough that every scripted frame is waiting before the merge wait ends.
const WAIT: Duration = Duration::from_millis(200);

/// An agent that answers `Hello` with `version`, writes `script` at once and then
/// records every message the host sends until it hangs up.
struct Scripted {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    host: JoinHandle<Vec<Message>>,
}

impl Scripted {
    fn start(version: u16, script: Vec<Message>) -> Scripted {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let host = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut frames = FrameReader::new();
            let hello = frames.read_message(&mut stream).unwrap();
            assert!(matches!(hello, Some(Message::Hello { .. })), "{hello:?}");
            let mut bytes = proto::encode_frame(&Message::Hello {
                min_version: version,
                max_version: version,
                role: Role::Agent,
            })
            .unwrap();
            for m in &script {
                bytes.extend(proto::encode_frame(m).unwrap());
            }
            std::io::Write::write_all(&mut stream, &bytes).unwrap();
            let mut got = Vec::new();
            loop {
                match frames.read_message(&mut stream) {
                    Ok(Some(m)) => got.push(m),
                    Ok(None) => {}
                    Err(ProtoError::Closed | ProtoError::Io(_)) => return got,
                    Err(e) => panic!("the host sent a bad frame: {e}"),
                }
            }
        });
        Scripted {
            _dir: dir,
            socket,
            host,
        }
    }

    fn client(&self) -> AgentClient {
        AgentClient::connect(&self.socket, T).unwrap()
    }

    /// What the host sent after `Hello`, once `client` is dropped.
    fn sent(self, client: AgentClient) -> Vec<Message> {
        drop(client);
        self.host.join().unwrap()
    }
}

fn output(stream: Stream, offset: u64, bytes: &[u8]) -> Message {
    Message::Output {
        exec_id: 1,
        stream,
        offset,
        bytes: bytes.to_vec(),
    }
}

fn exit(total_bytes: u64) -> Message {
    Message::ExecExit {
        exec_id: 1,
        code: Some(0),
        signal: None,
        timed_out: false,
        total_bytes,
    }
}

/// Three stdout frames, two stderr frames, one stdout frame, then the exit.
fn mixed_streams() -> Vec<Message> {
    vec![
        output(Stream::Stdout, 0, b"aaaa"),
        output(Stream::Stdout, 4, b"aaaa"),
        output(Stream::Stdout, 8, b"aaaa"),
        output(Stream::Stderr, 12, b"eeee"),
        output(Stream::Stderr, 16, b"eeee"),
        output(Stream::Stdout, 20, b"bb"),
        exit(22),
    ]
}

type Chunk = (Stream, u64, Vec<u8>);

fn follow(c: &mut AgentClient) -> (Result<reel_agent::ExecOutcome, ClientError>, Vec<Chunk>) {
    let mut chunks = Vec::new();
    let result = c.follow(1, 0, |stream, offset, bytes| {
        chunks.push((stream, offset, bytes.to_vec()))
    });
    (result, chunks)
}

fn acks(sent: &[Message]) -> Vec<u64> {
    sent.iter()
        .filter_map(|m| match m {
            Message::Ack { exec_id: 1, offset } => Some(*offset),
            _ => None,
        })
        .collect()
}

#[test]
fn waiting_frames_of_one_stream_are_merged_never_across_streams() {
    let agent = Scripted::start(1, mixed_streams());
    let mut c = agent.client();
    c.set_merge(1 << 20, WAIT);
    c.set_ack_every(1);
    let (result, chunks) = follow(&mut c);
    assert_eq!(result.unwrap().total_bytes, 22);
    assert_eq!(
        chunks,
        [
            (Stream::Stdout, 0, b"aaaaaaaaaaaa".to_vec()),
            (Stream::Stderr, 12, b"eeeeeeee".to_vec()),
            (Stream::Stdout, 20, b"bb".to_vec()),
        ]
    );
    // Each acknowledgement covers exactly what a callback had taken.
    assert_eq!(acks(&agent.sent(c)), [12, 20, 22]);
}

#[test]
fn a_merged_chunk_is_passed_on_when_it_reaches_the_bound() {
    let agent = Scripted::start(1, mixed_streams());
    let mut c = agent.client();
    c.set_merge(8, WAIT);
    c.set_ack_every(1);
    let (result, chunks) = follow(&mut c);
    assert_eq!(result.unwrap().total_bytes, 22);
    assert_eq!(
        chunks,
        [
            (Stream::Stdout, 0, b"aaaaaaaa".to_vec()),
            (Stream::Stdout, 8, b"aaaa".to_vec()),
            (Stream::Stderr, 12, b"eeeeeeee".to_vec()),
            (Stream::Stdout, 20, b"bb".to_vec()),
        ]
    );
    assert_eq!(acks(&agent.sent(c)), [8, 12, 20, 22]);
}

#[test]
fn without_merging_each_frame_is_one_callback() {
    let agent = Scripted::start(1, mixed_streams());
    let mut c = agent.client();
    c.set_ack_every(1 << 20);
    let (result, chunks) = follow(&mut c);
    assert_eq!(result.unwrap().total_bytes, 22);
    let offsets: Vec<u64> = chunks.iter().map(|(_, o, _)| *o).collect();
    assert_eq!(offsets, [0, 4, 8, 12, 16, 20]);
    // Below the acknowledgement interval only the end is acknowledged.
    assert_eq!(acks(&agent.sent(c)), [22]);
}

#[test]
fn bytes_sent_again_are_dropped_and_a_gap_is_an_error() {
    let agent = Scripted::start(
        1,
        vec![
            output(Stream::Stdout, 0, b"abcd"),
            output(Stream::Stdout, 2, b"cdef"),
            output(Stream::Stdout, 0, b"ab"),
            output(Stream::Stdout, 6, b"g"),
            exit(7),
        ],
    );
    let mut c = agent.client();
    let (result, chunks) = follow(&mut c);
    assert_eq!(result.unwrap().total_bytes, 7);
    assert_eq!(
        chunks,
        [
            (Stream::Stdout, 0, b"abcd".to_vec()),
            (Stream::Stdout, 4, b"ef".to_vec()),
            (Stream::Stdout, 6, b"g".to_vec()),
        ]
    );

    let agent = Scripted::start(
        1,
        vec![
            output(Stream::Stdout, 0, b"ab"),
            output(Stream::Stdout, 5, b"x"),
        ],
    );
    let mut c = agent.client();
    c.set_merge(1 << 20, WAIT);
    let (result, chunks) = follow(&mut c);
    match result {
        Err(ClientError::Protocol(m)) => assert!(m.contains("bytes 2..5 are missing"), "{m}"),
        other => panic!("unexpected {other:?}"),
    }
    // What arrived before the gap was passed on.
    assert_eq!(chunks, [(Stream::Stdout, 0, b"ab".to_vec())]);
}

#[test]
fn an_error_ends_the_follow_with_its_code_and_others_are_kept() {
    let agent = Scripted::start(
        2,
        vec![
            output(Stream::Stdout, 0, b"ab"),
            Message::Failure {
                exec_id: Some(2),
                code: ErrorCode::UnknownExec,
                message: "about another exec".into(),
            },
            output(Stream::Stdout, 2, b"cd"),
            Message::Failure {
                exec_id: Some(1),
                code: ErrorCode::OutputLost,
                message: "reworded at will".into(),
            },
        ],
    );
    let mut c = agent.client();
    c.set_merge(1 << 20, WAIT);
    let (result, chunks) = follow(&mut c);
    assert!(
        matches!(
            result,
            Err(ClientError::Agent {
                exec_id: Some(1),
                code: ErrorCode::OutputLost,
                ..
            })
        ),
        "{result:?}"
    );
    assert_eq!(
        chunks,
        [
            (Stream::Stdout, 0, b"ab".to_vec()),
            (Stream::Stdout, 2, b"cd".to_vec()),
        ]
    );
    assert!(matches!(
        c.recv(Some(T)).unwrap(),
        Some(Message::Failure {
            exec_id: Some(2),
            code: ErrorCode::UnknownExec,
            ..
        })
    ));
}

#[test]
fn a_kind_newer_than_the_negotiated_version_is_a_protocol_violation() {
    let failure = Message::Failure {
        exec_id: Some(1),
        code: ErrorCode::ExecExists,
        message: "x".into(),
    };
    let agent = Scripted::start(1, vec![failure]);
    let mut c = agent.client();
    assert_eq!(c.version(), 1);
    match follow(&mut c).0 {
        Err(ClientError::Protocol(m)) => {
            assert!(m.contains("Failure") && m.contains("version 1"), "{m}")
        }
        other => panic!("unexpected {other:?}"),
    }

    // A version-1 error on a version-2 connection is read, without a code.
    let error = Message::Error {
        exec_id: Some(1),
        message: "Exec 1 already exists.".into(),
    };
    let agent = Scripted::start(2, vec![error]);
    let mut c = agent.client();
    assert!(matches!(
        follow(&mut c).0,
        Err(ClientError::Agent {
            exec_id: Some(1),
            code: ErrorCode::Unspecified,
            ..
        })
    ));
}
