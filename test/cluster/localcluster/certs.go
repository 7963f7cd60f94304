package localcluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// pki is the cluster's one CA and what it signs, as files under Dir/pki.
// One CA for everything (API server, kubelet, clients) keeps it small;
// the CA is also what pods find in kube-root-ca.crt, so the SPIRE agent
// verifies the kubelet's serving certificate against it.
type pki struct {
	dir    string
	caCert *x509.Certificate
	caKey  *ecdsa.PrivateKey
}

func (c *Cluster) writePKI() error {
	p := &pki{dir: filepath.Join(c.Dir, "pki")}
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "spiffe-oci-hook local cluster CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(30 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	p.caCert, _ = x509.ParseCertificate(der)
	p.caKey = key
	if err := p.write("ca", der, key); err != nil {
		return err
	}
	ip := net.ParseIP(c.NodeIP)
	local := net.ParseIP("127.0.0.1")
	// 10.96.0.1: the kubernetes Service's ClusterIP, which pods find in
	// their environment (nothing routes it here: no kube-proxy).
	if err := p.issue("apiserver", "kube-apiserver", nil, true,
		[]string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "localhost", c.NodeName},
		[]net.IP{ip, local, net.ParseIP("10.96.0.1")}); err != nil {
		return err
	}
	if err := p.issue("admin", "kubernetes-admin", []string{"system:masters"}, false, nil, nil); err != nil {
		return err
	}
	if err := p.issue("kubelet-client", "system:node:"+c.NodeName, []string{"system:nodes"}, false, nil, nil); err != nil {
		return err
	}
	// The kubelet's serving certificate: the API server reaches it at the
	// node's InternalIP, the SPIRE agent's k8s attestor at 127.0.0.1.
	if err := p.issue("kubelet", c.NodeName, nil, true, []string{c.NodeName, "localhost"}, []net.IP{ip, local}); err != nil {
		return err
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	saDER, _ := x509.MarshalECPrivateKey(saKey)
	pubDER, _ := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err := os.WriteFile(p.path("sa.key"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: saDER}), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(p.path("sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o644); err != nil {
		return err
	}
	c.pki = p
	for name, cert := range map[string]string{"admin": "admin", "kubelet": "kubelet-client"} {
		if err := c.writeKubeconfig(filepath.Join(c.Dir, name+".kubeconfig"), cert); err != nil {
			return err
		}
	}
	c.Kubeconfig = filepath.Join(c.Dir, "admin.kubeconfig")
	return nil
}

func (p *pki) path(name string) string { return filepath.Join(p.dir, name) }

func (p *pki) write(name string, der []byte, key *ecdsa.PrivateKey) error {
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(p.path(name+".crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return err
	}
	return os.WriteFile(p.path(name+".key"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600)
}

var serial int64 = 1

// issue writes name.crt and name.key signed by the CA.
func (p *pki) issue(name, cn string, orgs []string, server bool, dns []string, ips []net.IP) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial++
	usage := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	if server {
		usage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: cn, Organization: orgs},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(30 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  usage,
		DNSNames:     dns,
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.caCert, &key.PublicKey, p.caKey)
	if err != nil {
		return fmt.Errorf("signing %s: %w", name, err)
	}
	return p.write(name, der, key)
}

// writeKubeconfig writes a kubeconfig for the API server at the node's
// address with the client certificate cert, embedded so that the file
// can be copied.
func (c *Cluster) writeKubeconfig(path, cert string) error {
	read := func(name string) string {
		data, _ := os.ReadFile(c.pki.path(name))
		return base64.StdEncoding.EncodeToString(data)
	}
	conf := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: local
  context:
    cluster: local
    user: %s
current-context: local
`, c.APIServer(), read("ca.crt"), cert, read(cert+".crt"), read(cert+".key"), cert)
	return os.WriteFile(path, []byte(conf), 0o600)
}
