package cluster

import (
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/noderesource/spiffe-oci-hook/test/cluster/localcluster"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// TestImageLayoutMatchesContainerfile: the image built offline for the
// cluster puts the project's files where deploy/Containerfile (the
// release recipe) does, with the same entrypoint.
func TestImageLayoutMatchesContainerfile(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(testhelp.RepoRoot(t), "deploy", "Containerfile"))
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	var entrypoint string
	final := false
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "FROM":
			// Only the last stage's files are in the image.
			final = len(f) == 2
			want = nil
		case "COPY":
			args := f[1:]
			if strings.HasPrefix(args[0], "--from=") {
				args = args[1:]
			}
			srcs, dst := args[:len(args)-1], args[len(args)-1]
			for _, s := range srcs {
				if strings.HasSuffix(dst, "/") {
					want = append(want, dst+path.Base(s))
				} else {
					want = append(want, dst)
				}
			}
		case "ENTRYPOINT":
			entrypoint = strings.Trim(strings.TrimPrefix(line, "ENTRYPOINT"), ` []"`)
		}
	}
	if !final {
		t.Fatal("deploy/Containerfile: the last stage is not a plain FROM image")
	}
	var got []string
	for p := range localcluster.ProjectFiles {
		got = append(got, p)
	}
	sort.Strings(want)
	sort.Strings(got)
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("offline image files %v, deploy/Containerfile copies %v", got, want)
	}
	if entrypoint != localcluster.ProjectEntrypoint {
		t.Errorf("offline image entrypoint %q, deploy/Containerfile %q", localcluster.ProjectEntrypoint, entrypoint)
	}
}
