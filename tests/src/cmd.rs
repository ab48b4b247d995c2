//! Running external commands with a deadline, and panicking with their output when they fail.

use std::{
    io::Read,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

/// How long a helper command (`ip`, `ethtool`, ...) may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// `program arg arg ...`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion with stdin closed and stdout/stderr captured; kills it and panics
/// if it takes longer than `timeout`.
pub fn output_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let what = describe(&cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
    let stdout = read_in_background(&mut child, true);
    let stderr = read_in_background(&mut child, false);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr =
                    String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
                panic!("`{what}` did not finish within {timeout:?}; its stderr:\n{stderr}");
            }
            Err(e) => panic!("waiting for `{what}`: {e}"),
        }
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn read_in_background(child: &mut Child, stdout: bool) -> thread::JoinHandle<Vec<u8>> {
    let pipe: Option<Box<dyn Read + Send>> = if stdout {
        child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>)
    } else {
        child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>)
    };
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// Runs `cmd`, panics (showing stderr) unless it exits 0, and returns its stdout.
pub fn run_checked(cmd: Command) -> String {
    let what = describe(&cmd);
    let out = output_with_timeout(cmd, COMMAND_TIMEOUT);
    if !out.status.success() {
        panic!(
            "`{what}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `argv[0] argv[1..]` in the current namespaces; see [`run_checked`].
pub fn run(argv: &[&str]) -> String {
    let (program, args) = argv.split_first().expect("run: empty command line");
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_checked(cmd)
}
