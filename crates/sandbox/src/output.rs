//! Where a step's stdout and stderr go: line by line, tagged by stream, to a caller's sink.

use std::sync::mpsc;

/// Longest line handed to a sink in one piece; longer runs without a newline are split so that
/// a program writing megabytes without `\n` cannot make memory grow.
pub const MAX_LINE: usize = 64 * 1024;

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputStream {
    /// The step's standard output (fd 1).
    Stdout,
    /// The step's standard error (fd 2).
    Stderr,
}

/// One line of output, without its trailing newline, as sent through a channel sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    /// The stream the line was written to.
    pub stream: OutputStream,
    /// The bytes of the line (not necessarily UTF-8), without `\n`.
    pub line: Vec<u8>,
}

/// Receives a step's output as it is produced. Lines of one stream arrive in the order they were
/// written; there is no ordering guarantee between the two streams (they are separate pipes).
pub trait OutputSink {
    /// Called once per line (without the `\n`); the last line of a stream may lack a newline.
    fn line(&mut self, stream: OutputStream, line: &[u8]);
}

impl<F: FnMut(OutputStream, &[u8])> OutputSink for F {
    fn line(&mut self, stream: OutputStream, line: &[u8]) {
        self(stream, line)
    }
}

/// Sends each line as an [`OutputLine`]; a dropped receiver just discards output, because the
/// step must still run to its end (or be cancelled) for its processes to be reaped.
impl OutputSink for mpsc::Sender<OutputLine> {
    fn line(&mut self, stream: OutputStream, line: &[u8]) {
        let _ = self.send(OutputLine {
            stream,
            line: line.to_vec(),
        });
    }
}

/// Same as for [`mpsc::Sender`], for a bounded channel (which gives back-pressure).
impl OutputSink for mpsc::SyncSender<OutputLine> {
    fn line(&mut self, stream: OutputStream, line: &[u8]) {
        let _ = self.send(OutputLine {
            stream,
            line: line.to_vec(),
        });
    }
}

/// Cuts one stream's bytes into lines.
pub(crate) struct LineSplitter {
    stream: OutputStream,
    pending: Vec<u8>,
}

impl LineSplitter {
    pub(crate) fn new(stream: OutputStream) -> Self {
        LineSplitter {
            stream,
            pending: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, mut data: &[u8], sink: &mut dyn OutputSink) {
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            if self.pending.is_empty() {
                sink.line(self.stream, &data[..pos]);
            } else {
                self.pending.extend_from_slice(&data[..pos]);
                sink.line(self.stream, &self.pending);
                self.pending.clear();
            }
            data = &data[pos + 1..];
        }
        self.pending.extend_from_slice(data);
        while self.pending.len() >= MAX_LINE {
            sink.line(self.stream, &self.pending[..MAX_LINE]);
            self.pending.drain(..MAX_LINE);
        }
    }

    pub(crate) fn finish(&mut self, sink: &mut dyn OutputSink) {
        if !self.pending.is_empty() {
            sink.line(self.stream, &self.pending);
            self.pending.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_across_reads_and_flushes_the_tail() {
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut sink = |_: OutputStream, l: &[u8]| got.push(l.to_vec());
        let mut s = LineSplitter::new(OutputStream::Stdout);
        s.push(b"ab", &mut sink);
        s.push(b"c\nde\n\nf", &mut sink);
        s.finish(&mut sink);
        assert_eq!(
            got,
            vec![b"abc".to_vec(), b"de".to_vec(), b"".to_vec(), b"f".to_vec()]
        );
    }

    #[test]
    fn long_lines_are_cut() {
        let mut lens = Vec::new();
        let mut sink = |_: OutputStream, l: &[u8]| lens.push(l.len());
        let mut s = LineSplitter::new(OutputStream::Stderr);
        s.push(&vec![b'x'; MAX_LINE * 2 + 5], &mut sink);
        s.finish(&mut sink);
        assert_eq!(lens, vec![MAX_LINE, MAX_LINE, 5]);
    }
}
