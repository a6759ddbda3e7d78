//! Credentials out of text that may reach a log, an error or `Debug` output.

/// Replaces the user information of every URL in `text` (`scheme://user:password@host`)
/// with `***`, so that error messages and logs never carry credentials.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (n, piece) in text
        .split_inclusive(|c: char| c.is_whitespace())
        .enumerate()
    {
        let _ = n;
        out.push_str(&redact_token(piece));
    }
    out
}

/// Redacts one whitespace-free token (with its trailing whitespace).
fn redact_token(token: &str) -> String {
    if !token.contains('@') {
        return token.to_owned();
    }
    // Several URLs may share a token (`nats://u:p@a,nats://u:p@b`): each
    // authority ends at a comma, a quote, or the next scheme.
    let mut out = String::with_capacity(token.len());
    let mut rest = token;
    if !rest.contains("://") {
        // No scheme (`user:password@host`): everything before the last `@`
        // of a `name:secret@` form goes.
        return match rest.rfind('@') {
            Some(at) if rest[..at].contains(':') => {
                let start = rest[..at].rfind(['"', '\'', '(', '=']).map_or(0, |i| i + 1);
                format!("{}***@{}", &rest[..start], &rest[at + 1..])
            }
            _ => rest.to_owned(),
        };
    }
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == ',' || c == '"' || c == '\'' || c.is_whitespace())
            .unwrap_or(tail.len());
        let end = tail[..end].find("://").map_or(end, |next| {
            // Back up to the start of the next scheme's name.
            tail[..next]
                .rfind(|c: char| !c.is_ascii_alphanumeric() && c != '+' && c != '-' && c != '.')
                .map_or(0, |i| i + 1)
        });
        let authority = &tail[..end];
        // The last `@` ends the user information, even if the password holds
        // `/`, `?` or `#`.
        match authority.rfind('@') {
            Some(i) => {
                out.push_str("***@");
                out.push_str(&authority[i + 1..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}
