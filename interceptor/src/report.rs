//! Errors here carry a message or a source, never both, so an error prints whole
//! only with its causes: this writes them in a line, outermost first. Some libraries'
//! errors (kube's) do both; a cause their message already ends with is written once.

use std::{error::Error, fmt};

/// Displays an error followed by each of its causes, `: `-separated.
pub struct Chain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut previous = self.0.to_string();
        f.write_str(&previous)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            let message = error.to_string();
            if !previous.ends_with(&message) {
                write!(f, ": {message}")?;
            }
            previous = message;
            cause = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot listen on 198.18.5.1:15001")]
    struct Listen(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error(transparent)]
    struct Wrapped(#[from] Listen);

    #[test]
    fn each_cause_appears_once() {
        let refused = || std::io::Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        let expected = format!("cannot listen on 198.18.5.1:15001: {}", refused());
        assert_eq!(Chain(&Listen(refused())).to_string(), expected);
        // A transparent wrapper adds nothing of its own.
        assert_eq!(Chain(&Wrapped(Listen(refused()))).to_string(), expected);
    }

    /// kube's errors put their source's text in their own message too.
    #[derive(Debug, thiserror::Error)]
    #[error("ServiceError: {0}")]
    struct Repeats(#[source] Listen);

    #[test]
    fn a_cause_the_message_already_ends_with_appears_once() {
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        let expected = format!("ServiceError: cannot listen on 198.18.5.1:15001: {refused}");
        assert_eq!(Chain(&Repeats(Listen(refused))).to_string(), expected);
    }
}
