//! What the three binaries share at their edge: how an error reaches a person.
//!
//! Owns: [`exit_on_error`]. Not used by the packet core.

/// Prints `error: …` with the error's chain, each cause once (a cause whose
/// text its parent already shows is not repeated), and exits with status 1.
/// No backtrace: a person gets the message; developers can debug with logs.
pub fn exit_on_error(result: anyhow::Result<()>) {
    if let Err(e) = result {
        eprintln!("error: {}", describe(&e));
        std::process::exit(1);
    }
}

/// The error chain as one line: `outer: cause: cause`, without repeats.
#[must_use]
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_not_repeated() {
        let inner = std::io::Error::other("70000 is not a valid port");
        let e = anyhow::Error::new(inner)
            .context("bad.yaml: 70000 is not a valid port")
            .context("manifest");
        assert_eq!(
            describe(&e),
            "manifest: bad.yaml: 70000 is not a valid port"
        );
        let e = anyhow::anyhow!("disk full").context("writing out.pcap");
        assert_eq!(describe(&e), "writing out.pcap: disk full");
    }
}
