//! Measures the fixed cost of a RUN step: runs `true` N times in chroot mode on a rootfs
//! directory and prints the mean and fastest wall time per step.
//!
//! Usage: `step_overhead ROOTFS [N]` (as root; the rootfs is not modified except for mount
//! targets that are created and removed around each step).

use std::time::{Duration, Instant};

use kiln_sandbox::{CancelToken, ChrootSandbox, Command, OutputStream, Sandbox, Step};

fn main() {
    let mut args = std::env::args().skip(1);
    let rootfs = args.next().expect("usage: step_overhead ROOTFS [N]");
    let runs: u32 = args
        .next()
        .map_or(50, |n| n.parse().expect("N is a number"));
    let sandbox = ChrootSandbox::new(&rootfs).expect("rootfs");
    let step = Step::new(Command::exec(["/bin/true"]));
    let mut sink = |_: OutputStream, _: &[u8]| {};
    let mut fastest = Duration::MAX;
    let start = Instant::now();
    for _ in 0..runs {
        let one = Instant::now();
        let outcome = sandbox
            .run(&step, &mut sink, &CancelToken::new())
            .expect("step runs");
        assert!(outcome.status.success());
        fastest = fastest.min(one.elapsed());
    }
    let mean = start.elapsed() / runs;
    println!(
        "chroot step overhead over {runs} runs of /bin/true: mean {mean:?}, fastest {fastest:?}"
    );
}
