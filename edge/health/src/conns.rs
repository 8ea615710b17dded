//! Established TCP connections to the edge's ports, read from
//! `/proc/net/tcp` and `/proc/net/tcp6` of this network namespace (the
//! health daemon runs beside the edge). Each is identified by its socket
//! inode, so a drain can tell the connections that existed when it started
//! from ones opened later.

use std::collections::HashSet;

/// Socket inodes of ESTABLISHED connections whose local port is in `ports`.
pub fn established(ports: &[u16]) -> HashSet<u64> {
    let mut out = HashSet::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(f) {
            out.extend(parse(&text, ports));
        }
    }
    out
}

/// Parses one `/proc/net/tcp*` table.
pub fn parse(text: &str, ports: &[u16]) -> Vec<u64> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let local = cols.get(1)?;
            let state = cols.get(3)?;
            let inode: u64 = cols.get(9)?.parse().ok()?;
            let port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (*state == "01" && ports.contains(&port) && inode != 0).then_some(inode)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_established_sockets_on_the_given_ports() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0A0071CB:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0\n\
   1: 0A0071CB:0050 810071CB:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 1002 1 0\n\
   2: 0A0071CB:01BB 810071CB:D2F2 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0\n\
   3: 0A0071CB:2378 810071CB:D2F4 01 00000000:00000000 00:00000000 00000000     0        0 1004 1 0\n\
   4: 0A0071CB:0050 810071CB:D2F6 06 00000000:00000000 00:00000000 00000000     0        0 0 1 0\n";
        let mut got = parse(table, &[80, 443]);
        got.sort();
        assert_eq!(got, vec![1002, 1003]);
    }
}
