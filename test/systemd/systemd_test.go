package systemd

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/test/spiretest"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

const (
	stateDir   = "/run/spiffe-oci-hook"
	annotation = "identity.noderesource.dev/container"
	// Flow style: Podman 4.3 keeps only the first line of an --annotation.
	delivery = "[{cert_dir: /certs}]"
	// web (uid 1000) also asks for a renew_signal: the refresher must be
	// allowed to signal another uid's process (CAP_KILL).
	webDelivery = "[{cert_dir: /certs, renew_signal: SIGHUP}]"
	dbDelivery  = "[{cert_dir: /certs, svid_bundle_file_name: ca.pem}]"
	svidTTL     = 30 * time.Second
	unitPath    = "/usr/lib/systemd/system/spiffe-oci-refresher.service"
)

// printID is a busybox script printing the SPIFFE ID of the first
// certificate in /certs/svid.pem: the DER's URI SAN (tag 0x86, a length
// byte, "spiffe://...").
const printID = `sed -n '1,/END CERTIFICATE/p' /certs/svid.pem | grep -v -- ----- | base64 -d | od -An -v -tx1 | awk '
function hex(h) { return (index("0123456789abcdef", substr(h, 1, 1)) - 1) * 16 + index("0123456789abcdef", substr(h, 2, 1)) - 1 }
{ for (i = 1; i <= NF; i++) b[n++] = $i }
END { for (i = 0; i < n - 4; i++) if (b[i] == "86" && b[i+2] == "73" && b[i+3] == "70" && b[i+4] == "69") { l = hex(b[i+1]); s = ""; for (j = 0; j < l; j++) s = s sprintf("%c", hex(b[i+2+j])); print s; exit } }'`

// Podman inside the node: runc, private vfs storage, and no pids limit
// (this host's cgroup v2 hierarchy has no controllers: they are all on v1).
const containersConf = `[containers]
pids_limit = 0
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "systemd"
events_logger = "file"
`

const storageConf = `[storage]
driver = "vfs"
graphroot = "/var/lib/soh-node/storage"
runroot = "/run/soh-node/storage"
`

// quadletUnit is the service Quadlet (Podman ≥ 4.4) generates for a
// NAME.container file with Rootfs=, Network=none and an Annotation= (less
// SourcePath=, as there is no such file here); the cgroups mode and the
// annotation vary. The container prints its SPIFFE ID as its first act,
// then waits.
func quadletUnit(name, cgroups, annotationArg string) string {
	return `[Unit]
Description=` + name + ` (as Quadlet generates it from ` + name + `.container)
After=spire-agent.service spiffe-oci-refresher.service
RequiresMountsFor=%t/containers

[Service]
Environment=PODMAN_SYSTEMD_UNIT=%n
KillMode=mixed
ExecStop=/usr/bin/podman rm -f -i --cidfile=%t/%N.cid
ExecStopPost=-/usr/bin/podman rm -f -i --cidfile=%t/%N.cid
Delegate=yes
Type=notify
NotifyAccess=all
SyslogIdentifier=%N
ExecStart=/usr/bin/podman run --name=systemd-%N --cidfile=%t/%N.cid --replace --rm --cgroups=` + cgroups + ` --network=none --sdnotify=conmon -d ` + annotationArg + ` --rootfs /srv/soh/` + name + ` /bin/sh -c "echo ` + name + `: $$(` + "sh /print-id" + `); exec sleep 100000"

[Install]
WantedBy=multi-user.target default.target
`
}

// TestSystemdNode: on a node where the state directory does not exist, the
// unit `make install` installs starts under systemd through Type=notify with
// its hardening intact, keeps two Quadlet-style services' containers (each
// with its own identity through SPIRE's systemd attestor) rotating, survives
// a restart and stops cleanly; a container started outside those units gets
// no identity.
func TestSystemdNode(t *testing.T) {
	skipUnlessNode(t)
	root := testhelp.RepoRoot(t)
	for _, b := range []string{"spiffe-oci-hook", "spiffe-oci-refresher"} {
		if _, err := os.Stat(filepath.Join(root, "bin", b)); err != nil {
			t.Fatalf("bin/%s is missing: run make build (make test-systemd does)", b)
		}
	}
	serverBin, _ := spiretest.Binaries(t)
	n := bootNode(t, map[string]string{root: "/src", filepath.Dir(serverBin): spireBinInNode})

	// A packager's install, into the node's overlay.
	n.must("make -s -C /src install.nobuild PREFIX=/usr")
	if out, _ := n.sh("ls -d " + stateDir + " 2>&1"); !strings.Contains(out, "No such file") {
		t.Fatalf("%s exists before the refresher starts: %s", stateDir, out)
	}
	agentID := startSPIRE(t, n)
	createEntry(t, n, agentID, hookID, 0, "unix:uid:0", "unix:path:/usr/libexec/oci/hooks.d/spiffe-oci-hook-direct")
	createEntry(t, n, agentID, refresherID, 0, "unix:uid:0", "unix:path:/usr/bin/spiffe-oci-refresher")
	for _, svc := range []string{"web", "db", "api"} {
		createEntry(t, n, agentID, "spiffe://"+trustDomain+"/"+svc, svidTTL, "systemd:id:"+svc+".service")
	}
	// Only inotify (no periodic rescan within the test) tells the refresher
	// about new containers.
	n.must(`sed -i 's/^  rescan_interval: .*/  rescan_interval: 1h/' /etc/spiffe-oci-hook/config.yaml && grep -q 'rescan_interval: 1h' /etc/spiffe-oci-hook/config.yaml`)
	// Every entry exists before its container starts: the two containers
	// that must get none are refused after 5 s instead of the shipped
	// config's 30 s wait for an entry on its way.
	n.must(`sed -i 's/^registration_wait: .*/registration_wait: 5s/' /etc/spiffe-oci-hook/config.yaml && grep -q '^registration_wait: 5s' /etc/spiffe-oci-hook/config.yaml`)

	t.Run("the unit before the fix fails on a fresh node", func(t *testing.T) { oldUnitFails(t, n) })

	t.Run("enable --now reaches active through Type=notify", func(t *testing.T) {
		n.must("systemctl enable --now spiffe-oci-refresher")
		props := n.must("systemctl show -p ActiveState -p SubState -p Type -p DropInPaths spiffe-oci-refresher")
		for _, want := range []string{"ActiveState=active", "SubState=running", "Type=notify", "DropInPaths=\n"} {
			if !strings.Contains(props+"\n", want) {
				t.Errorf("systemctl show: want %q in\n%s", want, props)
			}
		}
		if got := strings.TrimSpace(n.must("stat -c '%a %U %G' " + stateDir)); got != "700 root root" {
			t.Errorf("%s: %s, want 700 root root", stateDir, got)
		}
		n.must(waitFor(10, "journalctl -u spiffe-oci-refresher -o cat | grep -F 'msg=ready'"))
	})
	if t.Failed() {
		t.FailNow()
	}

	n.write("/etc/containers/containers.conf", containersConf, 0o644)
	n.write("/etc/containers/storage.conf", storageConf, 0o644)
	n.write("/print-id", printID+"\n", 0o755)
	for _, svc := range []string{"web", "db", "api", "hand"} {
		n.must("r=/srv/soh/" + svc + "; mkdir -p $r/bin $r/proc $r/sys $r/dev $r/tmp $r/etc && cp /bin/busybox $r/bin/ && " +
			"for a in sh sleep cat ls sed grep base64 od awk echo; do ln -sf busybox $r/bin/$a; done && cp /print-id $r/print-id")
	}
	plain := `"--annotation=` + annotation + `=` + delivery + `"`
	// web runs as uid 1000 (Quadlet's User=): its files must stay that
	// uid's through rotations and refresher restarts.
	// Two fields need a comma, which Podman 4.3 splits on unless the whole
	// KEY=VALUE is one quoted CSV field (\" is a quote inside systemd's
	// double quotes).
	n.write("/etc/systemd/system/web.service", quadletUnit("web", "split", `--user=1000:1000 "--annotation=\"`+annotation+`=`+webDelivery+`\""`), 0o644)
	n.write("/etc/systemd/system/db.service", quadletUnit("db", "split", `"--annotation=\"`+annotation+`=`+dbDelivery+`\""`), 0o644)
	n.write("/etc/systemd/system/api.service", quadletUnit("api", "enabled", plain), 0o644)
	n.must("systemctl daemon-reload")

	t.Run("each service's container reads its own identity first", func(t *testing.T) {
		n.must("systemctl start web db")
		for _, svc := range []string{"web", "db"} {
			want := svc + ": spiffe://" + trustDomain + "/" + svc
			out := n.must(waitFor(20, "podman logs systemd-"+svc+" | grep -x '"+want+"'"))
			t.Logf("%s", strings.TrimSpace(out))
		}
		if out := n.must("podman exec systemd-db ls /certs"); !strings.Contains(out, "ca.pem") {
			t.Errorf("db's second field (svid_bundle_file_name: ca.pem) was lost: /certs holds %s", out)
		}
	})
	if t.Failed() {
		t.FailNow()
	}

	t.Run("a container started outside the units gets no identity", func(t *testing.T) {
		out, err := n.sh("podman run --rm --name soh-by-hand --network=none --annotation '" + annotation + "=" + delivery + "' --rootfs /srv/soh/hand /bin/sh /print-id")
		if err == nil {
			t.Fatalf("the container started: %s", out)
		}
		t.Logf("podman run by hand: %s", lastLines(out, 3))
		if !strings.Contains(out, "no registration entry matches") {
			t.Errorf("podman run by hand did not fail with the hook's line:\n%s", out)
		}
		if out := n.must("journalctl -t spiffe-oci-hook -o cat"); !strings.Contains(out, "no registration entry matches") {
			t.Errorf("journalctl -t spiffe-oci-hook lacks the hook's line:\n%s", out)
		}
	})

	t.Run("--cgroups=enabled moves the container out of its unit", func(t *testing.T) {
		out, err := n.sh("systemctl start api")
		if err == nil {
			t.Fatalf("api.service (--cgroups=enabled) started: its container is not in its unit's cgroup, yet got an identity")
		}
		hookLog := n.must("journalctl -t spiffe-oci-hook -o cat | tail -n 3")
		t.Logf("systemctl start api: %s; hook: %s", strings.TrimSpace(out), strings.TrimSpace(hookLog))
		n.sh("systemctl reset-failed api")
	})

	t.Run("the refresher keeps both rotating", func(t *testing.T) {
		for _, svc := range []string{"web", "db"} {
			waitRotation(t, n, svc)
		}
		journal := n.must("journalctl -u spiffe-oci-refresher -o cat")
		for _, svc := range []string{"web", "db"} {
			if !strings.Contains(journal, "spiffe_id=spiffe://"+trustDomain+"/"+svc) {
				t.Errorf("journalctl -u spiffe-oci-refresher: no line serving %s:\n%s", svc, journal)
			}
		}
		if strings.Contains(journal, "level=ERROR") {
			t.Errorf("the refresher logged errors under its hardening:\n%s", journal)
		}
		// web's container (uid 1000, its init a sleep without a handler,
		// which the kernel then drops the signal for) was signalled after
		// each rotation: pidfd_send_signal to another uid needs CAP_KILL.
		if strings.Contains(journal, "msg=renew_signal") {
			t.Errorf("the refresher could not send web's renew_signal under its hardening:\n%s", journal)
		}
	})

	t.Run("restart keeps serving with no file lost", func(t *testing.T) {
		before := listCerts(t, n)
		if !strings.Contains(before, "svid_key.pem") || !regexp.MustCompile(`-rw------- 1000 1000 svid_key.pem`).MatchString(before) {
			t.Errorf("web (uid 1000) does not own its key:\n%s", before)
		}
		n.must("systemctl restart spiffe-oci-refresher && systemctl is-active spiffe-oci-refresher")
		if after := listCerts(t, n); after != before {
			t.Errorf("files after restart:\n%s\nbefore:\n%s", after, before)
		}
		waitRotation(t, n, "web")
	})

	t.Run("a container that exits is forgotten", func(t *testing.T) {
		id := strings.TrimSpace(n.must("podman inspect -f '{{.Id}}' systemd-db"))
		n.must("systemctl stop db")
		out := n.must(waitFor(20, "journalctl -u spiffe-oci-refresher -o cat | grep -E 'msg=\"(forgot container|removed container state)\" container="+id+"'"))
		t.Logf("refresher: %s", strings.TrimSpace(out))
		if out, _ := n.sh("ls " + stateDir + "/records"); strings.Contains(out, id) {
			t.Errorf("db's record is still in the state directory: %s", out)
		}
	})

	t.Run("systemd-analyze security", func(t *testing.T) {
		out, _ := n.sh("systemd-analyze security --no-pager spiffe-oci-refresher")
		m := regexp.MustCompile(`Overall exposure level for spiffe-oci-refresher.service: ([0-9.]+)`).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("systemd-analyze security:\n%s", out)
		}
		t.Logf("systemd-analyze security spiffe-oci-refresher: exposure %s", m[1])
		for _, line := range strings.Split(out, "\n") {
			if strings.HasPrefix(strings.TrimSpace(line), "✗") {
				t.Logf("  %s", strings.Join(strings.Fields(line), " "))
			}
		}
	})

	t.Run("stop is prompt and clean, and keeps the files", func(t *testing.T) {
		start := time.Now()
		n.must("systemctl stop spiffe-oci-refresher")
		took := time.Since(start)
		props := n.must("systemctl show -p Result -p ActiveState spiffe-oci-refresher")
		if !strings.Contains(props, "Result=success") || !strings.Contains(props, "ActiveState=inactive") {
			t.Errorf("after stop: %s", props)
		}
		journal := n.must("journalctl -u spiffe-oci-refresher -o cat")
		if !strings.Contains(journal, "msg=stopping") || strings.Contains(journal, "SIGKILL") || strings.Contains(journal, "timed out") {
			t.Errorf("stop was not graceful:\n%s", lastLines(journal, 20))
		}
		t.Logf("systemctl stop took %s", took.Round(time.Millisecond))
		if out := n.must("podman exec systemd-web sh /print-id"); strings.TrimSpace(out) != "spiffe://"+trustDomain+"/web" {
			t.Errorf("after the refresher stopped, web reads %q", out)
		}
		if got := strings.TrimSpace(n.must("stat -c '%a %U' " + stateDir)); got != "700 root" {
			t.Errorf("%s after stop: %s", stateDir, got)
		}
	})
}

// oldUnitFails starts the unit as it was before RuntimeDirectory= (the
// directory made writable with ReadWritePaths= and created by a "+"
// ExecStartPre=) on this fresh node, and shows how it fails.
func oldUnitFails(t *testing.T, n *node) {
	n.must(`sed -e 's|^RuntimeDirectory=.*|ExecStartPre=+/bin/mkdir -p -m 0700 ` + stateDir + `\nReadWritePaths=` + stateDir + `|' -e '/^RuntimeDirectory/d' ` +
		unitPath + ` > /etc/systemd/system/soh-before-fix.service && systemctl daemon-reload`)
	defer n.sh("systemctl stop soh-before-fix; systemctl reset-failed soh-before-fix; rm -f /etc/systemd/system/soh-before-fix.service; systemctl daemon-reload; rmdir " + stateDir + " 2>/dev/null")
	if out, err := n.sh("systemctl start soh-before-fix"); err == nil {
		t.Fatalf("the unit with ReadWritePaths=%s started on a node without the directory: %s", stateDir, out)
	}
	journal := n.must("journalctl -u soh-before-fix -o cat")
	if !strings.Contains(journal, "226/NAMESPACE") {
		t.Errorf("want status=226/NAMESPACE:\n%s", journal)
	}
	for _, line := range strings.Split(journal, "\n") {
		if strings.Contains(line, "NAMESPACE") || strings.Contains(line, "namespacing") {
			t.Logf("before the fix: %s", line)
		}
	}
	if out, _ := n.sh("ls -d " + stateDir + " 2>&1"); strings.Contains(out, "No such file") {
		t.Logf("the \"+\" ExecStartPre= never ran: %s is still absent", stateDir)
	}
}

// waitRotation waits until svc's container sees a new certificate with
// the same SPIFFE ID.
func waitRotation(t *testing.T, n *node, svc string) {
	t.Helper()
	want := "spiffe://" + trustDomain + "/" + svc
	first := n.must("podman exec systemd-" + svc + " cat /certs/svid.pem")
	start := time.Now()
	for time.Since(start) < 2*svidTTL {
		time.Sleep(2 * time.Second)
		now := n.must("podman exec systemd-" + svc + " cat /certs/svid.pem")
		if now != first {
			if id := strings.TrimSpace(n.must("podman exec systemd-" + svc + " sh /print-id")); id != want {
				t.Errorf("%s rotated to %q, want %s", svc, id, want)
			}
			t.Logf("%s: new certificate after %s (TTL %s)", svc, time.Since(start).Round(time.Second), svidTTL)
			return
		}
	}
	journal, _ := n.sh("journalctl -u spiffe-oci-refresher -o cat | tail -n 20; echo ==== agent; journalctl -u spire-agent -o cat | grep -iE 'error|warn|web' | tail -n 15; echo ==== state; find /run/spiffe-oci-hook -exec ls -ld --time-style=+%T {} + | tail -n 30")
	t.Errorf("%s: no new certificate within %s (TTL %s); the refresher's journal ends:\n%s", svc, 2*svidTTL, svidTTL, journal)
}

// listCerts lists the files each running service's container sees.
func listCerts(t *testing.T, n *node) string {
	t.Helper()
	return n.must("for c in web db; do echo $c; podman exec systemd-$c ls -lL /certs | awk '{print $1, $3, $4, $NF}'; done")
}
