package e2e

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	rspec "github.com/opencontainers/runtime-spec/specs-go"
)

const (
	nginxID  = "spiffe://example.org/nginx"
	clientID = "spiffe://example.org/client"
)

// newHostUsrBundle is a bundle whose rootfs runs the host's programs: the
// host's /usr bind-mounted read-only, Debian's merged-/usr links, a few
// files of its own in /etc, and the host's network (the two containers
// meet on 127.0.0.1).
func newHostUsrBundle(t *testing.T, args []string) *bundle {
	t.Helper()
	b := newBundle(t, args)
	// Drop the busybox tree's /bin: /bin is the host's /usr/bin here.
	if err := os.RemoveAll(filepath.Join(b.rootfs, "bin")); err != nil {
		t.Fatal(err)
	}
	for _, l := range []string{"bin", "sbin", "lib", "lib64"} {
		if err := os.Symlink("usr/"+l, filepath.Join(b.rootfs, l)); err != nil {
			t.Fatal(err)
		}
	}
	os.MkdirAll(filepath.Join(b.rootfs, "usr"), 0o755)
	os.WriteFile(filepath.Join(b.rootfs, "etc", "passwd"), []byte("root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"), 0o644)
	os.WriteFile(filepath.Join(b.rootfs, "etc", "group"), []byte("root:x:0:\nnogroup:x:65534:\n"), 0o644)
	b.AddMount(rspec.Mount{Destination: "/usr", Type: "bind", Source: "/usr", Options: []string{"rbind", "ro", "nosuid", "nodev"}})
	b.RemoveLinuxNamespace("network")
	return b
}

// nginxConf serves mutual TLS on port from the delivered files: the
// server's SVID, and client certificates checked against the bundle. The
// answer tells whether nginx verified the client, and which certificate
// it presented.
func nginxConf(port int) string {
	return fmt.Sprintf(`daemon off;
master_process on;
worker_processes 1;
user nobody nogroup;
pid /tmp/nginx.pid;
error_log stderr notice;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path /tmp/body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    server {
        listen 127.0.0.1:%d ssl;
        ssl_certificate /certs/svid.pem;
        ssl_certificate_key /certs/svid_key.pem;
        ssl_client_certificate /certs/svid_bundle.pem;
        ssl_verify_client on;
        ssl_verify_depth 3;
        location / {
            return 200 "verify=$ssl_client_verify\ncert=$ssl_client_escaped_cert\n";
        }
    }
}
`, port)
}

func freeTCPPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// mtlsResult is what one client container saw.
type mtlsResult struct {
	server *x509.Certificate // the leaf nginx presented
	client *x509.Certificate // the certificate nginx says the client presented
	out    string
}

// connect runs a second annotated container with openssl s_client: it
// presents its own SVID, verifies nginx's against its bundle, and asks.
func (e *env) connect(t *testing.T, port int) (mtlsResult, error) {
	t.Helper()
	script := fmt.Sprintf(`printf 'GET / HTTP/1.0\r\n\r\n' | openssl s_client -connect 127.0.0.1:%d -cert /certs/svid.pem -key /certs/svid_key.pem -CAfile /certs/svid_bundle.pem -verify_return_error -showcerts -ign_eof 2>&1`, port)
	b := newHostUsrBundle(t, []string{"/bin/sh", "-c", script})
	b.AddAnnotation(annotation, "- cert_dir: /certs\n  spiffe_id: "+clientID+"\n")
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
	out, stderr, err := b.runc(t)
	r := mtlsResult{out: out + stderr}
	if err != nil {
		return r, fmt.Errorf("client container: %v", err)
	}
	if !strings.Contains(out, "Verify return code: 0 (ok)") {
		return r, fmt.Errorf("openssl did not verify nginx's certificate")
	}
	if !strings.Contains(out, "verify=SUCCESS") {
		return r, fmt.Errorf("nginx did not verify the client's certificate")
	}
	if block, _ := pem.Decode([]byte(out[strings.Index(out, "-----BEGIN CERTIFICATE-----"):])); block != nil {
		r.server, _ = x509.ParseCertificate(block.Bytes)
	}
	_, certField, _ := strings.Cut(out, "cert=")
	certField, _, _ = strings.Cut(certField, "\n")
	if clientPEM, err := url.QueryUnescape(certField); err == nil {
		if block, _ := pem.Decode([]byte(clientPEM)); block != nil {
			r.client, _ = x509.ParseCertificate(block.Bytes)
		}
	}
	if r.server == nil || r.client == nil {
		return r, fmt.Errorf("no server or client certificate in the exchange")
	}
	return r, nil
}

func uriOf(c *x509.Certificate) string {
	if len(c.URIs) != 1 {
		return fmt.Sprint(c.URIs)
	}
	return c.URIs[0].String()
}

// TestNginxMutualTLS: nginx (Debian's, as its container's init) serves
// mutual TLS from its delivered files; openssl s_client in a second
// annotated container presents its own SVID; both sides verify. After a
// rotation the refresher sends nginx its renew_signal (SIGHUP), nginx
// re-reads its files, and the next client sees the new certificate from
// the same nginx master, which never restarted.
func TestNginxMutualTLS(t *testing.T) {
	if _, err := os.Stat("/usr/sbin/nginx"); err != nil {
		t.Fatal("nginx is missing: run test/deps.sh")
	}
	e := startEnv(t)
	// Both match every uid-0 process: each delivery picks its own with
	// spiffe_id. nginx's SVID lives 30 s, so it rotates within the test.
	e.spire.CreateEntry(t, nginxID, []string{"unix:uid:0"}, 30*time.Second)
	e.spire.CreateEntry(t, clientID, []string{"unix:uid:0"}, time.Hour)
	e.waitSynced()
	e.startRefresher(t)

	port := freeTCPPort(t)
	server := newHostUsrBundle(t, []string{"/usr/sbin/nginx", "-e", "stderr", "-p", "/tmp", "-c", "/etc/nginx-test.conf"})
	if err := os.WriteFile(filepath.Join(server.rootfs, "etc", "nginx-test.conf"), []byte(nginxConf(port)), 0o644); err != nil {
		t.Fatal(err)
	}
	server.AddAnnotation(annotation, "- cert_dir: /certs\n  spiffe_id: "+nginxID+"\n  renew_signal: SIGHUP\n")
	server.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
	log := server.runDetached(t, "runc")
	runcState := func() string {
		out, _ := exec.Command("runc", "--root", filepath.Join(server.dir, "runc-root"), "state", server.id).Output()
		return strings.TrimSpace(string(out))
	}
	state := runcState()
	certFile := filepath.Join(e.stateDir, "containers", server.id, "0", "svid.pem")

	// First exchange: nginx may still be starting.
	var first mtlsResult
	deadline := time.Now().Add(15 * time.Second)
	for {
		var err error
		if first, err = e.connect(t, port); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no verified exchange with nginx: %v\nclient:\n%s\nnginx:\n%s", err, first.out, readFile(log))
		}
		time.Sleep(500 * time.Millisecond)
	}
	if got := uriOf(first.server); got != nginxID {
		t.Errorf("nginx presented %s, want %s", got, nginxID)
	}
	if got := uriOf(first.client); got != clientID {
		t.Errorf("nginx saw client %s, want %s", got, clientID)
	}
	if !first.server.Equal(leafOf(t, readFile(certFile))) {
		t.Errorf("nginx presented a certificate other than its delivered one")
	}
	t.Logf("mutual TLS verified both ways: nginx %s (serial %s), client %s", uriOf(first.server), first.server.SerialNumber, uriOf(first.client))

	// Rotation: the refresher rewrites nginx's files and sends SIGHUP.
	deadline = time.Now().Add(45 * time.Second)
	for leafOf(t, readFile(certFile)).Equal(first.server) {
		if time.Now().After(deadline) {
			t.Fatalf("nginx's delivered certificate did not rotate in 45 s")
		}
		time.Sleep(300 * time.Millisecond)
	}
	rotated := leafOf(t, readFile(certFile))
	var second mtlsResult
	deadline = time.Now().Add(15 * time.Second)
	for {
		r, err := e.connect(t, port)
		if err == nil && !r.server.Equal(first.server) {
			second = r
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the rotation nginx still presents its first certificate (err %v)\nnginx:\n%s", err, readFile(log))
		}
		time.Sleep(500 * time.Millisecond)
	}
	if !second.server.Equal(rotated) && !second.server.NotBefore.After(rotated.NotBefore) {
		t.Errorf("nginx presents serial %s, want the rotated %s", second.server.SerialNumber, rotated.SerialNumber)
	}
	if got := uriOf(second.client); got != clientID {
		t.Errorf("after the reload nginx saw client %s", got)
	}
	if got := runcState(); got != state {
		t.Errorf("nginx's container changed across the reload:\nbefore %s\nafter %s", state, got)
	}
	if nginxLog := readFile(log); !strings.Contains(nginxLog, "signal 1 (SIGHUP) received") || !strings.Contains(nginxLog, "reconfiguring") {
		t.Errorf("nginx did not log a SIGHUP reload:\n%s", nginxLog)
	}
	t.Logf("after the rotation nginx presents serial %s without a restart", second.server.SerialNumber)
}
