#!/bin/sh
# Rebuilds this machine's PostgreSQL cluster (Debian, 15/main) from a copy of
# the backup host's directory (roles/backup: base/<time>/ and wal/): the
# newest base backup, then every WAL record the archive holds, then it ends
# recovery and takes writes on a new timeline. Run as root on a fresh
# machine with postgresql-15 installed; the cluster there is replaced.
#   restore-primary.sh /path/to/copy-of/var/lib/edgefront-backup
# docs/deploy.md, "Backups and restore".
set -eu
src=${1:?usage: restore-primary.sh BACKUP_COPY_DIR}
version=15
data=/var/lib/postgresql/$version/main
wal=/var/lib/postgresql/$version/restore-wal
base=$(ls -1d "$src"/base/2*Z 2>/dev/null | sort | tail -n 1)
[ -n "$base" ] || { echo "restore-primary: no base backup in $src/base" >&2; exit 1; }
echo "restore-primary: base backup $base"

systemctl stop "postgresql@$version-main"
rm -rf "$data" "$wal"
install -d -o postgres -g postgres -m 0700 "$data" "$wal"
tar -xzf "$base/base.tar.gz" -C "$data"
# The archive's WAL; its last segment (still being written when copied) under
# its final name.
for f in "$src"/wal/*; do
  [ -e "$f" ] || continue
  cp "$f" "$wal/$(basename "$f" .partial)"
done
chown -R postgres:postgres "$data" "$wal"
# Recovery refuses settings below the primary's (max_wal_senders and the
# like): take them from the backup's control file.
setting() {
  "/usr/lib/postgresql/$version/bin/pg_controldata" "$data" | sed -n "s/^$1 setting: *//p"
}
cat > "/etc/postgresql/$version/main/conf.d/zz-restore.conf" <<CONF
# restore-primary.sh: replay the archive, then take writes.
restore_command = 'cp $wal/%f %p'
recovery_target_timeline = 'latest'
# At least the primary's (pg_controldata of the backup).
max_connections = $(setting max_connections)
max_worker_processes = $(setting max_worker_processes)
max_wal_senders = $(setting max_wal_senders)
max_prepared_transactions = $(setting max_prepared_xacts)
max_locks_per_transaction = $(setting max_locks_per_xact)
CONF
runuser -u postgres -- touch "$data/recovery.signal"
if ! timeout 1h systemctl start "postgresql@$version-main"; then
  echo "restore-primary: PostgreSQL did not start; its log:" >&2
  tail -n 20 "/var/log/postgresql/postgresql-$version-main.log" >&2
  exit 1
fi
# Replay takes as long as the archive is long: wait while it moves, give up
# only when it has not moved for 5 minutes.
last=; still=0
until [ "$(runuser -u postgres -- psql -tAc 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ]; do
  now=$(runuser -u postgres -- psql -tAc 'SELECT pg_last_wal_replay_lsn()' 2>/dev/null || true)
  if [ "$now" = "$last" ]; then still=$((still + 1)); else still=0; last=$now; fi
  [ $still -lt 600 ] || { echo "restore-primary: recovery stuck at $now for 5 minutes" >&2; exit 1; }
  sleep 0.5
done
rm -f "/etc/postgresql/$version/main/conf.d/zz-restore.conf"
echo "restore-primary: restored to $(runuser -u postgres -- psql -tAc 'SELECT pg_current_wal_lsn()'), taking writes"
