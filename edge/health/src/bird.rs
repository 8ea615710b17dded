//! A client for BIRD's control socket: the same line protocol `birdc`
//! speaks, without forking `birdc` per decision.
//!
//! On connect BIRD sends `0001 BIRD x.y ready.`. Each command is one line; the
//! reply is lines of `NNNN-text` (continuation), ` text` (continuation of the
//! previous code) or `NNNN text` (the last line). Codes 0xxx are success,
//! 1xxx/2xxx table data, 8xxx/9xxx errors (e.g. `9001 syntax error`,
//! `8001 Network not found`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Errors talking to BIRD.
#[derive(Debug, thiserror::Error)]
pub enum BirdError {
    #[error("BIRD control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("BIRD control socket {0}: no reply within the timeout")]
    Timeout(String),
    #[error("BIRD control socket {0}: unexpected banner {1:?}")]
    Banner(String, String),
    #[error("BIRD refused {command:?}: {code} {text}")]
    Refused {
        command: String,
        code: u16,
        text: String,
    },
    #[error("BIRD control socket {0}: malformed reply line {1:?}")]
    Malformed(String, String),
}

/// One reply: the final code and every text line.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<(u16, String)>,
}

impl Reply {
    /// The text of all lines, joined.
    pub fn text(&self) -> String {
        self.lines
            .iter()
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A connected control session.
pub struct Bird {
    path: PathBuf,
    io: BufReader<UnixStream>,
    timeout: Duration,
}

impl Bird {
    /// Connects and reads the banner (bounded by `timeout`).
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Bird, BirdError> {
        let p = path.display().to_string();
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| BirdError::Timeout(p.clone()))?
            .map_err(|source| BirdError::Io {
                path: p.clone(),
                source,
            })?;
        let mut bird = Bird {
            path: path.to_owned(),
            io: BufReader::new(stream),
            timeout,
        };
        let banner = bird.read_reply().await?;
        if banner.code != 1 {
            return Err(BirdError::Banner(p, banner.text()));
        }
        Ok(bird)
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    async fn read_reply(&mut self) -> Result<Reply, BirdError> {
        let mut lines = Vec::new();
        let mut last_code = 0u16;
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(self.timeout, self.io.read_line(&mut line))
                .await
                .map_err(|_| BirdError::Timeout(self.name()))?
                .map_err(|source| BirdError::Io {
                    path: self.name(),
                    source,
                })?;
            if n == 0 {
                return Err(BirdError::Io {
                    path: self.name(),
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
            let line = line.trim_end_matches('\n');
            match parse_line(line) {
                Some(ParsedLine::Continuation(text)) => lines.push((last_code, text.to_owned())),
                Some(ParsedLine::Coded { code, last, text }) => {
                    last_code = code;
                    if !text.is_empty() {
                        lines.push((code, text.to_owned()));
                    }
                    if last {
                        return Ok(Reply { code, lines });
                    }
                }
                None => return Err(BirdError::Malformed(self.name(), line.to_owned())),
            }
        }
    }

    /// Sends one command; error replies (8xxx, 9xxx) become [`BirdError::Refused`].
    pub async fn command(&mut self, command: &str) -> Result<Reply, BirdError> {
        let path = self.name();
        let io = |source| BirdError::Io { path, source };
        self.io
            .get_mut()
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(io)?;
        let reply = self.read_reply().await?;
        // An error may be the only line, or the last after data lines.
        if let Some((code, text)) = reply
            .lines
            .iter()
            .find(|(c, _)| *c >= 8000)
            .cloned()
            .or_else(|| (reply.code >= 8000).then(|| (reply.code, reply.text())))
        {
            return Err(BirdError::Refused {
                command: command.to_owned(),
                code,
                text,
            });
        }
        Ok(reply)
    }

    /// `enable`s (announce) or `disable`s (withdraw) a protocol. Returns
    /// whether BIRD changed anything (false: it was already so).
    pub async fn set_protocol(&mut self, protocol: &str, enabled: bool) -> Result<bool, BirdError> {
        let verb = if enabled { "enable" } else { "disable" };
        let reply = self.command(&format!("{verb} {protocol}")).await?;
        Ok(!reply.text().contains("already"))
    }

    /// The state column of `show protocols <name>` (`up`, `down`, `start`…)
    /// and its info column (`Established`, …).
    pub async fn protocol_state(&mut self, protocol: &str) -> Result<(String, String), BirdError> {
        let reply = self.command(&format!("show protocols {protocol}")).await?;
        protocol_row(&reply, protocol).ok_or_else(|| BirdError::Refused {
            command: format!("show protocols {protocol}"),
            code: reply.code,
            text: "no such protocol in the reply".into(),
        })
    }

    /// Every protocol's (name, proto, state, info) from `show protocols`.
    pub async fn protocols(&mut self) -> Result<Vec<ProtocolRow>, BirdError> {
        let reply = self.command("show protocols").await?;
        Ok(protocol_rows(&reply))
    }

    /// The AS path of the best route to `prefix`, from `show route for … all`;
    /// `None` when there is no route.
    pub async fn best_as_path(&mut self, prefix: &str) -> Result<Option<Vec<u32>>, BirdError> {
        match self
            .command(&format!("show route {prefix} primary all"))
            .await
        {
            Ok(reply) => Ok(as_path(&reply)),
            Err(BirdError::Refused { code: 8001, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// One row of `show protocols`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtocolRow {
    pub name: String,
    pub proto: String,
    pub state: String,
    pub info: String,
}

enum ParsedLine<'a> {
    Coded {
        code: u16,
        last: bool,
        text: &'a str,
    },
    Continuation(&'a str),
}

fn parse_line(line: &str) -> Option<ParsedLine<'_>> {
    if let Some(rest) = line.strip_prefix(' ') {
        return Some(ParsedLine::Continuation(rest));
    }
    let code: u16 = line.get(..4)?.parse().ok()?;
    match line.as_bytes().get(4) {
        Some(b'-') => Some(ParsedLine::Coded {
            code,
            last: false,
            text: &line[5..],
        }),
        Some(b' ') => Some(ParsedLine::Coded {
            code,
            last: true,
            text: &line[5..],
        }),
        None => Some(ParsedLine::Coded {
            code,
            last: true,
            text: "",
        }),
        _ => None,
    }
}

fn protocol_rows(reply: &Reply) -> Vec<ProtocolRow> {
    reply
        .lines
        .iter()
        .filter(|(code, _)| *code == 1002)
        .filter_map(|(_, text)| {
            let cols: Vec<&str> = text.split_whitespace().collect();
            // Name Proto Table State Since(1 or 2 words) Info…
            if cols.len() < 5 {
                return None;
            }
            let since_words = if cols.get(5).is_some_and(|c| c.contains(':')) {
                2
            } else {
                1
            };
            Some(ProtocolRow {
                name: cols[0].to_owned(),
                proto: cols[1].to_owned(),
                state: cols[3].to_owned(),
                info: cols.get(4 + since_words..).unwrap_or_default().join(" "),
            })
        })
        .collect()
}

fn protocol_row(reply: &Reply, name: &str) -> Option<(String, String)> {
    protocol_rows(reply)
        .into_iter()
        .find(|r| r.name == name)
        .map(|r| (r.state, r.info))
}

fn as_path(reply: &Reply) -> Option<Vec<u32>> {
    let mut saw_route = false;
    for (_, text) in &reply.lines {
        let t = text.trim();
        if let Some(path) = t.strip_prefix("BGP.as_path:") {
            return Some(
                path.split_whitespace()
                    .filter_map(|a| a.parse().ok())
                    .collect(),
            );
        }
        if t.contains('[') {
            saw_route = true;
        }
    }
    // A route that did not come from BGP (none in our setups): empty path.
    saw_route.then(Vec::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(raw: &str) -> Reply {
        let mut lines = Vec::new();
        let mut last = 0;
        for l in raw.lines() {
            match parse_line(l).expect("parses") {
                ParsedLine::Continuation(t) => lines.push((last, t.to_owned())),
                ParsedLine::Coded { code, text, .. } => {
                    last = code;
                    if !text.is_empty() {
                        lines.push((code, text.to_owned()));
                    }
                }
            }
        }
        Reply { code: last, lines }
    }

    #[test]
    fn parses_protocol_tables_as_bird_2_prints_them() {
        let r = reply(
            "2002-Name       Proto      Table      State  Since         Info\n\
             1002-anycast    Static     master4    up     06:41:02.759  \n\
             1002-upstream1  BGP        ---        up     06:41:03.001  Established   \n\
             1002-peer_x     BGP        ---        start  2026-11-23 06:41:03  Active        Socket: Connection refused\n\
             0000 \n",
        );
        let rows = protocol_rows(&r);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].state, "up");
        assert_eq!(rows[1].info, "Established");
        assert_eq!(rows[2].state, "start");
        assert_eq!(rows[2].info, "Active Socket: Connection refused");
        assert_eq!(
            protocol_row(&r, "anycast"),
            Some(("up".to_owned(), String::new()))
        );
    }

    #[test]
    fn reads_the_as_path_of_the_best_route() {
        let r = reply(
            "1007-Table master4:\n\
             \x20203.0.113.10/32      unicast [to_sin1 06:41:05.000] * (100) [AS64500i]\n\
             1008-\tType: BGP univ\n\
             1012-\tBGP.origin: IGP\n\
             \x20\tBGP.as_path: 65002 64500\n\
             \x20\tBGP.next_hop: 192.0.2.131\n\
             0000 \n",
        );
        assert_eq!(as_path(&r), Some(vec![65002, 64500]));
    }

    #[test]
    fn rejects_lines_that_are_not_the_protocol() {
        assert!(parse_line("hello").is_none());
        assert!(parse_line("0001x").is_none());
        assert!(matches!(
            parse_line("0000"),
            Some(ParsedLine::Coded {
                code: 0,
                last: true,
                ..
            })
        ));
    }
}
