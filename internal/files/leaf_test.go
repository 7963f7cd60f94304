package files

import (
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestLeaf: the writer imports nothing of this project. What a delivery
// holds is package render's; were the writer to learn of SPIFFE, agents
// or annotations again, the rule of which files a delivery gets could
// grow a second home here.
func TestLeaf(t *testing.T) {
	names, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	for _, name := range names {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range f.Imports {
			path, _ := strconv.Unquote(imp.Path.Value)
			if strings.HasPrefix(path, "github.com/noderesource/spiffe-oci-hook/") || strings.HasPrefix(path, "github.com/spiffe/") {
				t.Errorf("%s imports %s", name, path)
			}
		}
	}
}
