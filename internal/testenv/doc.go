// Package testenv starts throwaway real servers for integration tests:
// PostgreSQL clusters configured for logical replication, embedded NATS
// JetStream servers, and nats-server processes that can be killed with
// SIGKILL.
//
// # Usage
//
// A test package that uses testenv must route its TestMain through Main, so
// that servers shared by the whole test binary are stopped before it exits:
//
//	func TestMain(m *testing.M) { testenv.Main(m) }
//
//	func TestRelay(t *testing.T) {
//		pg := testenv.Postgres(t)   // fresh database in the shared cluster
//		pg.Exec(t, `CREATE TABLE outbox (id bigserial PRIMARY KEY, payload jsonb)`)
//		js := testenv.StartNATSProcess(t, 0, "") // nats-server process with JetStream
//		// ... connect to pg.URL and js.URL ...
//	}
//
// Every helper calls t.Helper, registers its own t.Cleanup, and fails the test
// with an error that names what was being done.
//
// # PostgreSQL
//
// Postgres(t) returns a brand-new database (CREATE DATABASE with a unique
// name) in a cluster shared by all tests of the test binary. The cluster is
// created on first use (about one second) and stopped by Main. In t.Cleanup
// the database's replication slots are dropped (terminating the walsenders
// that hold them), its prepared transactions are rolled back and the database
// is dropped WITH (FORCE); problems there are logged, never fatal.
//
// Tests that stop, crash, restart or misconfigure PostgreSQL use
// NewCluster(t, opts...) to get a private cluster, which is destroyed in
// t.Cleanup. WithConfig adds postgresql.conf lines; they come last and so
// override the defaults (for example WithConfig("wal_level = replica")).
//
// Clusters are created with initdb --no-sync --auth=trust -U postgres
// --wal-segsize=1 and run with wal_level=logical, fsync=off, up to 20 WAL
// senders and replication slots, max_prepared_transactions=10 and
// log_replication_commands=on. They listen on 127.0.0.1 at a free port, put
// their Unix socket in the data directory and log to Cluster.LogFile
// (readable with Cluster.Log).
//
// initdb and pg_ctl are taken from PATH, else from the highest version in
// /usr/lib/postgresql/*/bin. If they are missing the test is skipped with a
// hint (apt-get install postgresql-15); when the environment variable CI is
// true it fails instead, so CI cannot silently skip integration tests.
//
// # Running as root
//
// initdb and postgres refuse to run as root. When the test binary runs with
// effective UID 0 (CI containers, some dev VMs), testenv runs initdb, pg_ctl
// and therefore postgres as the OS user "postgres" (created by the Debian and
// Ubuntu postgresql packages), using exec.Cmd's SysProcAttr.Credential. The
// cluster directory is then created with os.MkdirTemp under os.TempDir() and
// chowned to that user: t.TempDir() is not used because its parent directory
// is mode 0700 and not traversable by another user. As a non-root user
// everything runs as that user.
//
// If a test binary dies before Main's cleanup runs (a panic or a -timeout), its
// cluster keeps running. Each new cluster therefore first stops and removes the
// clusters under os.TempDir() whose creating process no longer exists.
//
// # NATS
//
// testenv does not import the nats-server module: the tests of the outbox and
// inbox libraries use it, and whatever their tests import lands in the module
// graph of every program that imports those libraries. The in-process server,
// natsembed.JetStream(t) (127.0.0.1, JetStream enabled; Restart brings it back
// on the same port and store directory), is in the subpackage natsembed.
//
// Tests that need a real process (to kill -9 it, or to stay clear of the
// nats-server module) use NATSServerBinary(t), which
// finds or builds a nats-server binary (built at most once per machine and
// version), and StartNATSProcess(t, port, storeDir), which runs it with
// sync_interval: always so that acknowledged messages survive SIGKILL.
//
// StartNATSCluster(t, 3) runs a JetStream cluster of three such processes on loopback
// (server_name n1..n3, one cluster name, routes to each other, a store directory and an HTTP
// monitoring port each, free ports), for replicated (R3) streams. A node can be killed
// (Kill), stopped cleanly (Stop), paused with SIGSTOP (Pause, Resume) and restarted (Start);
// StreamLeader finds a stream's leader, StepDown asks it to step down
// ($JS.API.STREAM.LEADER.STEPDOWN.<stream>), WaitNewLeader waits for the next one,
// WaitStreamCurrent until every replica has caught up, and ClientNode names the node a client
// is connected to. Everything is killed by PID in t.Cleanup.
//
// testenv works on Linux and other Unix-like systems only.
package testenv
