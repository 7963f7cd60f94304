package cri

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// hookRejected: with NRI's default validator set to refuse OCI hook
// adjustments (reject_oci_hook_adjustment), containerd refuses the hook
// spiffe-oci-nri injects. An annotated pod's container then fails to be
// created, with containerd's line naming the refused hook injection in
// crictl's error (the kubelet's CreateContainerError), and never runs
// without its identity; a pod that asked for nothing is not touched.
// The setting is undone afterwards.
func hookRejected(t *testing.T, c *containerd) {
	c.node.register(t, "shop", "default", time.Hour)
	nriToml := filepath.Join(c.dir, "containerd-nri.toml")
	orig, err := os.ReadFile(nriToml)
	if err != nil {
		t.Fatal(err)
	}
	const section = "[plugins.'io.containerd.nri.v1.nri'.default_validator]\n    enable = true\n"
	if !strings.Contains(string(orig), section) {
		t.Fatalf("the overlay's containerd-nri.toml has no default_validator section as expected:\n%s", orig)
	}
	restart := func(toml string) {
		t.Helper()
		if err := os.WriteFile(nriToml, []byte(toml), 0o644); err != nil {
			t.Fatal(err)
		}
		c.stop(t)
		mark := fileSize(c.log)
		c.start(t)
		c.waitRegistered(t, mark)
	}
	restart(strings.Replace(string(orig), section, section+"    reject_oci_hook_adjustment = true\n", 1))
	defer restart(string(orig))

	p := c.runPod(t, "hook-rejected", "shop", map[string]string{annotation: "- cert_dir: /certs\n"})
	ctr, err := p.run(t, "app", 0, "echo STARTED; "+idle)
	if err == nil {
		t.Fatal("an annotated container was created while containerd refuses OCI hook injection")
	}
	if want := "attempted restricted OCI hook injection"; !strings.Contains(err.Error(), want) {
		t.Errorf("crictl's error lacks %q:\n%v", want, err)
	}
	notRun(t, c.runtime, p, ctr)

	plain := c.runPod(t, "no-identity", "shop", nil)
	out := plain.mustRun(t, "app", 0, "echo PLAIN")
	out.waitLog(t, "PLAIN")
}
