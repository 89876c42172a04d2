//! The probes' runner: one line per case, then `N passed, N failed`; the exit code says
//! whether every case got the answer the specifications require.

pub type R<T> = Result<T, String>;

/// A named check against the target.
pub type Case<'a> = (&'static str, Box<dyn Fn() -> R<()> + 'a>);

pub fn run(cases: Vec<Case<'_>>) -> ! {
    let (mut passed, mut failed) = (0, 0);
    for (name, case) in cases {
        match case() {
            Ok(()) => {
                passed += 1;
                println!("ok    {name}");
            }
            Err(e) => {
                failed += 1;
                println!("FAIL  {name}: {e}");
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
