package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const demoID = "spiffe://example.org/demo/web"

// demoScript runs inside the container: each time cert_dir's generation
// changes it prints the SPIFFE ID and expiry of the certificate, read from
// the DER with busybox alone, and it exits after it has seen a rotation.
const demoScript = `show() {
  sed -n '1,/END CERTIFICATE/p' /certs/$1/svid.pem | grep -v -- ----- | base64 -d | od -An -v -tx1 | awk '
  function hex(h) { return (index("0123456789abcdef", substr(h, 1, 1)) - 1) * 16 + index("0123456789abcdef", substr(h, 2, 1)) - 1 }
  { for (i = 1; i <= NF; i++) b[n++] = $i }
  END {
    for (i = 2; i < n - 4; i++) {
      if (id == "" && b[i] == "86" && b[i+2] == "73" && b[i+3] == "70" && b[i+4] == "69") { l = hex(b[i+1]); for (j = 0; j < l; j++) id = id sprintf("%c", hex(b[i+2+j])) }
      if (na == "" && b[i-2] == "30" && b[i-1] == "1e" && b[i] == "17" && b[i+1] == "0d") { for (j = 0; j < 12; j++) na = na sprintf("%c", hex(b[i+17+j])) }
    }
    printf "SPIFFE ID %s, certificate expires 20%s-%s-%s %s:%s:%s UTC\n", id, substr(na, 1, 2), substr(na, 3, 2), substr(na, 5, 2), substr(na, 7, 2), substr(na, 9, 2), substr(na, 11, 2)
  }'
}
last=""; n=0; i=0
while [ $i -lt 120 ]; do
  g=$(readlink /certs/..data)
  if [ "$g" != "$last" ]; then
    n=$((n+1)); echo "container: files version $n: $(show $g)"; last=$g
    if [ $n -ge 2 ]; then echo "container: rotated in place, no restart"; exit 0; fi
  fi
  sleep 1; i=$((i+1))
done
echo "container: no rotation seen in 120 s"; exit 1`

// TestDemo is `make demo`: a pinned SPIRE server and agent in a temp dir
// with a 30 s TTL entry, the refresher, and an annotated Podman container
// that prints its SPIFFE ID and expiry from the files and then a rotation.
// Everything it starts is stopped and removed when it ends.
func TestDemo(t *testing.T) {
	if os.Getenv("SPIFFE_OCI_DEMO") == "" {
		t.Skip("the demo runs with `make demo`")
	}
	say := func(format string, args ...any) { fmt.Printf("demo: "+format+"\n", args...) }
	say("starting a SPIRE server and agent (v%s) on unix sockets in a temp dir", spireVersion)
	e := startEnv(t)
	say("agent admin socket %s; authorized delegates: %s, %s", e.spire.AdminSocket, hookID, refresherID)
	e.spire.CreateEntry(t, demoID, []string{"unix:uid:0"}, 30*time.Second)
	e.waitSynced()
	say("registered %s for processes running as uid 0, with a 30 s X.509 SVID TTL", demoID)
	say("NOTE: unix:uid:0 is a demo shortcut: it matches every container this node creates, so all of them would get %s", demoID)
	say("      to give each Podman container its own identity, run it from a systemd unit and register systemd:id:<unit>; see docs/podman.md")

	r := e.startRefresher(t)
	say("spiffe-oci-refresher is running (log: %s)", r.log)
	hooksDir := renderHooksDir(t, e.config)
	rootfs := filepath.Join(shortTempDir(t), "rootfs")
	makeBusyboxRootfs(t, rootfs)
	store := podmanStore(t)
	say("podman run --hooks-dir %s --annotation 'identity.noderesource.dev/container=- cert_dir: /certs' ...", hooksDir)

	args := []string{
		"--root", filepath.Join(store, "root"), "--runroot", filepath.Join(store, "runroot"),
		"--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
		"run", "--rm", "--network", "none",
		"--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
		"--hooks-dir", hooksDir, "--annotation", annotation + "=- cert_dir: /certs",
		"--rootfs", rootfs, "/bin/sh", "-c", demoScript,
	}
	cmd := exec.Command("podman", args...)
	var out strings.Builder
	cmd.Stdout = &teeWriter{&out}
	cmd.Stderr = &teeWriter{&out}
	start := time.Now()
	if err := cmd.Run(); err != nil {
		t.Fatalf("the demo container failed: %v\n%s\nrefresher log:\n%s", err, out.String(), readFile(r.log))
	}
	if !strings.Contains(out.String(), "files version 2: SPIFFE ID "+demoID) {
		t.Fatalf("the container did not show its identity rotating:\n%s", out.String())
	}
	say("done in %s; stopping SPIRE and the refresher and removing every temp dir", time.Since(start).Round(time.Second))
}

// teeWriter shows the container's lines as they come and keeps them.
type teeWriter struct{ b *strings.Builder }

func (w *teeWriter) Write(p []byte) (int, error) {
	os.Stdout.Write(p)
	return w.b.Write(p)
}
