//! `--chmod` with a symbolic mode (`u+x`, `go=r`, `a-w,u+s`, `+X`), applied as chmod(1) applies
//! it without a umask.

/// Applies a symbolic chmod expression (`u+x`, `go=r`, `a-w,u+s`, `+X`) to `mode`, as chmod(1)
/// does without a umask.
pub(crate) fn apply_symbolic(expr: &str, mode: u32, is_dir: bool) -> u32 {
    let mut mode = mode & 0o7777;
    for clause in expr.split(',') {
        let who_end = clause.find(['+', '-', '=']).unwrap_or(clause.len());
        let who = &clause[..who_end];
        let mut mask = 0u32;
        for c in who.chars() {
            mask |= match c {
                'u' => 0o4700,
                'g' => 0o2070,
                'o' => 0o1007,
                'a' => 0o7777,
                _ => 0,
            };
        }
        if who.is_empty() {
            mask = 0o7777;
        }
        let mut rest = &clause[who_end..];
        while let Some(op) = rest.chars().next() {
            let perms_end = rest[1..]
                .find(['+', '-', '='])
                .map_or(rest.len(), |i| i + 1);
            let perms = &rest[1..perms_end];
            let mut bits = 0u32;
            for c in perms.chars() {
                bits |= match c {
                    'r' => 0o444,
                    'w' => 0o222,
                    'x' => 0o111,
                    'X' if is_dir || mode & 0o111 != 0 => 0o111,
                    's' => 0o6000,
                    't' => 0o1000,
                    'u' => copy_class(mode, 6),
                    'g' => copy_class(mode, 3),
                    'o' => copy_class(mode, 0),
                    _ => 0,
                };
            }
            let bits = bits & mask;
            match op {
                '+' => mode |= bits,
                '-' => mode &= !bits,
                _ => mode = (mode & !(mask & 0o7777)) | bits,
            }
            rest = &rest[perms_end..];
        }
    }
    mode
}

/// The rwx bits of one class (`shift` 6 user, 3 group, 0 other) replicated to all classes.
fn copy_class(mode: u32, shift: u32) -> u32 {
    let rwx = (mode >> shift) & 0o7;
    rwx << 6 | rwx << 3 | rwx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbolic_modes_apply_like_chmod() {
        assert_eq!(apply_symbolic("u+x", 0o644, false), 0o744);
        assert_eq!(apply_symbolic("go=r", 0o777, false), 0o744);
        assert_eq!(apply_symbolic("a-w", 0o666, false), 0o444);
        assert_eq!(apply_symbolic("+X", 0o644, true), 0o755);
        assert_eq!(apply_symbolic("+X", 0o644, false), 0o644);
        assert_eq!(apply_symbolic("u=rwx,g=rx,o=", 0o000, false), 0o750);
        assert_eq!(apply_symbolic("g=u", 0o640, false), 0o660);
    }
}
