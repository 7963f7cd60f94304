package packaging

import (
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// TestContainerfile: the image puts the binaries where the DaemonSet runs
// and copies them from.
func TestContainerfile(t *testing.T) {
	root := testhelp.RepoRoot(t)
	data, err := os.ReadFile(filepath.Join(root, "deploy", "Containerfile"))
	if err != nil {
		t.Fatal(err)
	}
	inImage := map[string]bool{}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != "COPY" || !strings.HasPrefix(f[1], "--from=") {
			continue
		}
		dst := f[len(f)-1]
		for _, src := range f[2 : len(f)-1] {
			if strings.HasSuffix(dst, "/") {
				inImage[dst+path.Base(src)] = true
			} else {
				inImage[dst] = true
			}
		}
	}
	d := checkNodeDeployment(t, resolveKustomization(t, filepath.Join(root, "deploy", "kubernetes", "base")), false, wantHooksDir("crio", false))
	refresher := d.pod.Containers[0].Command[0]
	if !inImage[refresher] {
		t.Errorf("the refresher container runs %s, which the Containerfile does not put there (it copies %v)", refresher, inImage)
	}
	found := false
	for img := range inImage {
		if path.Base(img) == "spiffe-oci-hook" {
			found = true
			if d.scriptLine("put "+img+" ") < 0 {
				t.Errorf("the install script does not copy the image's %s:\n%s", img, d.script)
			}
		}
	}
	if !found {
		t.Errorf("the Containerfile puts no spiffe-oci-hook binary in the image: %v", inImage)
	}
}
