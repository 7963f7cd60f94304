// Package spiretest runs a real SPIRE server and agent for integration
// tests: v1.15.3 (V115, the primary line, built from the pinned tools
// module in test/spire115) or v1.13.3 (V113, Options.Version, the
// compatibility line, from test/spire). Import it only from _test.go files.
//
// Binaries:
//
//	func Binaries(t testing.TB) (server, agent string)           // V115
//	func VersionBinaries(t testing.TB, version string) (server, agent string)
//	func HelperBinary(t testing.TB) string                        // spiffe-helper (test/spire)
//
// return the paths of spire-server and spire-agent. Unless SPIRE_BIN_DIR is
// set, V113's live in <repo>/bin/test/ and V115's in <repo>/bin/test/spire-1.15/
// (the repo root is found by walking up from the working directory to the
// go.mod of github.com/noderesource/spiffe-oci-hook) and are (re)built by
// test/spire/build.sh or test/spire115/build.sh, which are no-ops when the
// binaries are newer than their go.mod. The first build takes several
// minutes (about 14 for 1.15.3 on two cores); run `make spire` beforehand
// or give `go test` a -timeout larger than 20m. With SPIRE_BIN_DIR set,
// existing binaries there (and in its spire-1.15/) are used as-is and
// missing ones are built into that directory.
//
// The SPIFFE Broker API (V115 only): Options.Broker adds the agent's
// experimental.broker endpoint at s.BrokerSocket, admitting the harness
// (always) and Options.Brokers with PID references; Options.NoAdminSocket
// leaves admin_socket_path out altogether, and the harness then waits for
// SVIDs through the Broker API with its own SVID from the Workload API
// (s.HarnessIdentity, which tests also use as a broker SVID).
//
// Running SPIRE:
//
//	func Start(t testing.TB, opts Options) *SPIRE
//
// creates a short temp dir under /tmp (unix socket paths are limited to 108
// bytes) and starts:
//
//   - spire-server: sqlite datastore, KeyManager "memory", NodeAttestor
//     "join_token", TCP on 127.0.0.1:<free port>, API socket s.ServerSocket,
//     ca_ttl 24h, default X.509 SVID TTL 1h, entry cache reloaded every 1s
//     (experimental.cache_reload_interval).
//   - spire-agent: join token, insecure_bootstrap, KeyManager "disk" (so a
//     restarted agent re-uses its saved SVID; join-token agents can't
//     re-attest), Workload API at s.WorkloadSocket and the admin (Delegated
//     Identity) API at s.AdminSocket (different directories; SPIRE refuses
//     otherwise), WorkloadAttestor "unix" with discover_workload_path = true
//     (so entries can pin unix:path:<binary>), entry sync every 1s
//     (experimental.sync_interval).
//
// Everything is stopped and removed by t.Cleanup; on test failure the tails
// of the server and agent logs (s.Dir/server.log, s.Dir/agent.log) are
// t.Logged. Set SPIRETEST_KEEP=1 to keep the directory.
//
// The harness itself is a delegate: Start registers an entry
// (s.HarnessID = spiffe://<td>/spiretest/harness, selectors
// unix:uid:<os.Getuid()> and unix:path:<os.Executable()>) and always adds
// HarnessID to the agent's authorized_delegates, on top of
// Options.AuthorizedDelegates. That is what lets WaitForSVID and
// DelegatedClient talk to the admin socket from the test process. Start
// returns only after the harness has been authorized on the admin API,
// which also proves the agent has synced entries.
//
// To authorize another binary (e.g. the hook under test) as a delegate, list
// its SPIFFE ID in Options.AuthorizedDelegates and create its entry:
//
//	s := spiretest.Start(t, spiretest.Options{AuthorizedDelegates: []string{"spiffe://example.org/hook"}})
//	s.CreateEntry(t, "spiffe://example.org/hook", []string{"unix:uid:0", "unix:path:" + hookBin}, 0)
//
// Methods:
//
//	func (s *SPIRE) CreateEntry(t testing.TB, spiffeID string, selectors []string, x509TTL time.Duration) string
//	func (s *SPIRE) DeleteEntry(t testing.TB, entryID string)
//	func (s *SPIRE) StopAgent(t testing.TB)  // SIGTERM + wait; sockets go away
//	func (s *SPIRE) KillAgent(t testing.TB)  // SIGKILL + wait; stale socket files may remain
//	func (s *SPIRE) StartAgent(t testing.TB) // restart with same config and data dir, wait until ready
//	func (s *SPIRE) AgentRunning() bool
//	func (s *SPIRE) WaitForSVID(t testing.TB, pid int, spiffeID string, timeout time.Duration) *x509svid.SVID
//	func (s *SPIRE) BundlePEM(t testing.TB) []byte
//	func (s *SPIRE) TrustBundle(t testing.TB) *x509bundle.Bundle
//	func (s *SPIRE) DelegatedClient(t testing.TB) (delegatedidentityv1.DelegatedIdentityClient, func())
//	func (s *SPIRE) ServerCLI(t testing.TB, args ...string) []byte
//	func (s *SPIRE) CreateFederatedEntry(t testing.TB, spiffeID string, selectors []string, x509TTL time.Duration, federatesWith ...string) string
//	func (s *SPIRE) Federate(t testing.TB, other *SPIRE)
//	func (s *SPIRE) PrepareX509Authority(t testing.TB)
//
// Federation: Options.BundleEndpoint serves the server's bundle endpoint on
// 127.0.0.1 with the https_spiffe profile (s.BundleEndpointURL), and
// Options.ServerOnly starts a server without agent (a foreign trust
// domain). a.Federate(t, b) creates on a's server a federation relationship
// to b's endpoint, seeded with b's bundle as a SPIFFE document; call it
// both ways for two servers federated with each other. The endpoint's
// refresh hint is one minute (SPIRE's floor), with which a federated server
// polls it about every 15 s. PrepareX509Authority prepares the next CA,
// which enters the bundle: a foreign CA rotation.
//
// CreateEntry parents entries to the agent (s.AgentID =
// spiffe://<td>/spire/agent/join_token/<token>); x509TTL 0 means the server
// default, otherwise it is rounded down to whole seconds.
//
// WaitForSVID is event driven, not sleep based: it subscribes to the Delegated
// Identity API (SubscribeToX509SVIDs with Pid) and returns the first SVID with
// the wanted SPIFFE ID, retrying on errors (e.g. PermissionDenied before
// the harness entry has synced) and re-subscribing every few seconds as a
// safety net. A pid that matches no entry just gets updates with zero SVIDs.
//
// The harness and the agent run as the calling user; attesting processes of
// other users by pid needs root. Use RequireRoot in tests that need it.
package spiretest
