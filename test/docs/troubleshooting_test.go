package docs

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"unicode"
)

// message is an error message the hook can print, as the code writes it.
type message struct {
	format string // the format string, verbs and all
	where  string // file:line
}

// hookMessages returns the messages of the hook's binaries and of every
// package of this module they link (go list -deps ./hook ./hook/direct): the format of
// each errors.New and fmt.Errorf, and of each line package main writes to
// stderr. A message counts if it says something of its own: a leaf (no
// %w), or a wrapper with a phrase of four words or more (advice such as
// "start the SPIRE agent with admin_socket_path = %q (%w)"). Wrappers that
// only name a step ("files: creating %s: %w") read as their cause does.
func hookMessages(t *testing.T) []message {
	t.Helper()
	list := exec.Command("go", "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}} {{.Dir}}{{end}}", "./hook", "./hook/direct")
	list.Dir = repoRoot
	out, err := list.Output()
	if err != nil {
		t.Fatalf("go list -deps ./hook ./hook/direct: %v", err)
	}
	module := ""
	mod := exec.Command("go", "list", "-m")
	mod.Dir = repoRoot
	if m, err := mod.Output(); err == nil {
		module = strings.TrimSpace(string(m))
	}
	if module == "" {
		t.Fatal("go list -m: no module")
	}
	var msgs []message
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		path, dir, ok := strings.Cut(line, " ")
		if !ok || (path != module && !strings.HasPrefix(path, module+"/")) {
			continue
		}
		msgs = append(msgs, packageMessages(t, dir)...)
	}
	if len(msgs) < 50 {
		t.Fatalf("found only %d messages in the hook's packages", len(msgs))
	}
	return msgs
}

func packageMessages(t *testing.T, dir string) []message {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(dir, "*.go"))
	var msgs []message
	fset := token.NewFileSet()
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok || len(call.Args) == 0 {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			pkg, _ := sel.X.(*ast.Ident)
			if pkg == nil {
				return true
			}
			arg := call.Args[0]
			switch {
			case pkg.Name == "errors" && sel.Sel.Name == "New", pkg.Name == "fmt" && sel.Sel.Name == "Errorf":
			case f.Name.Name == "main" && pkg.Name == "fmt" && sel.Sel.Name == "Fprintf" && len(call.Args) > 1 && isIdent(call.Args[0], "stderr"):
				arg = call.Args[1]
			default:
				return true
			}
			format, ok := constString(arg)
			if !ok {
				// Not a constant: it passes on another error's text
				// (config's yaml errors), which is that error's line.
				return true
			}
			if counts(format) {
				msgs = append(msgs, message{format: format, where: fset.Position(call.Pos()).String()})
			}
			return true
		})
	}
	return msgs
}

func isIdent(e ast.Expr, name string) bool {
	id, ok := e.(*ast.Ident)
	return ok && id.Name == name
}

// constString evaluates a string literal, or a + of literals and named
// constants (a constant's value counts as a verb: anything).
func constString(e ast.Expr) (string, bool) {
	switch e := e.(type) {
	case *ast.BasicLit:
		if e.Kind != token.STRING {
			return "", false
		}
		s, err := strconv.Unquote(e.Value)
		return s, err == nil
	case *ast.BinaryExpr:
		if e.Op != token.ADD {
			return "", false
		}
		l, ok1 := constString(e.X)
		r, ok2 := constString(e.Y)
		return l + r, ok1 && ok2
	case *ast.Ident, *ast.SelectorExpr:
		return "%v", true
	}
	return "", false
}

// verb matches a fmt verb with its flags, width and precision.
var verb = regexp.MustCompile(`%[-+# 0]*[0-9]*(\.[0-9]+)?[a-zA-Z%]`)

// fragments splits a message at its verbs and returns the fixed text
// between them that holds at least two letters, trimmed of the spacing
// and punctuation that joins it to its verbs.
func fragments(format string) []string {
	var out []string
	for _, part := range verb.Split(strings.TrimSuffix(format, "\n"), -1) {
		part = strings.TrimFunc(part, func(r rune) bool {
			return unicode.IsSpace(r) || strings.ContainsRune(`:;,()"`, r)
		})
		letters := 0
		for _, r := range part {
			if unicode.IsLetter(r) {
				letters++
			}
		}
		if letters >= 2 {
			out = append(out, part)
		}
	}
	return out
}

// counts reports whether a message says something of its own (see
// hookMessages).
func counts(format string) bool {
	if !strings.Contains(format, "%w") {
		return len(fragments(format)) > 0
	}
	for _, f := range fragments(format) {
		if len(strings.Fields(f)) >= 4 {
			return true
		}
	}
	return false
}

// troubleshootingMessages returns the first cell of every row of
// docs/troubleshooting.md's tables: the messages, abridged with "…".
func troubleshootingMessages(t *testing.T) []string {
	t.Helper()
	var cells []string
	for _, line := range strings.Split(readDoc(t, "troubleshooting.md"), "\n") {
		if !strings.HasPrefix(line, "|") || strings.HasPrefix(line, "|---") {
			continue
		}
		cells = append(cells, strings.Split(line, "|")[1])
	}
	return cells
}

// covered reports whether a row holds every fragment of the message, in
// order: "…" in the row stands for what the verbs fill in.
func covered(row string, frags []string) bool {
	rest := row
	for _, f := range frags {
		i := strings.Index(rest, f)
		if i < 0 {
			return false
		}
		rest = rest[i+len(f):]
	}
	return true
}

// TestTroubleshootingCoversHookMessages: every message the hook can print
// has a row in docs/troubleshooting.md that quotes it (abridged with "…"
// where the message fills in a value).
func TestTroubleshootingCoversHookMessages(t *testing.T) {
	rows := troubleshootingMessages(t)
	msgs := hookMessages(t)
	missing := 0
	for _, m := range msgs {
		frags := fragments(m.format)
		ok := false
		for _, row := range rows {
			if covered(row, frags) {
				ok = true
				break
			}
		}
		if !ok {
			missing++
			t.Errorf("%s: %q has no entry in docs/troubleshooting.md (a row quoting %q, in order)", m.where, m.format, frags)
		}
	}
	t.Logf("%d hook messages, %d without an entry", len(msgs), missing)
}

// TestFragments pins how a message is cut into the phrases a row must
// quote.
func TestFragments(t *testing.T) {
	for format, want := range map[string][]string{
		"cert_dir %q must not contain '..'":                           {"cert_dir", "must not contain '..'"},
		"agent %s did not answer in time: %w":                         {"agent", "did not answer in time"},
		"delivery %d is empty":                                        {"delivery", "is empty"},
		"spiffe-oci-hook: unknown stage %q: use createRuntime or x\n": {"spiffe-oci-hook: unknown stage", "use createRuntime or x"},
		"audience %.40q... is longer than %d bytes":                   {"audience", "... is longer than", "bytes"},
		"files: chown %s to %d:%d: %w":                                {"files: chown", "to"},
	} {
		if got := fragments(format); strings.Join(got, "|") != strings.Join(want, "|") {
			t.Errorf("fragments(%q) = %q, want %q", format, got, want)
		}
	}
	if counts("files: creating %s: %w") {
		t.Error("a wrapper that only names its step counts")
	}
	if !counts("agent admin socket %s is missing: start the SPIRE agent with admin_socket_path = %q (%w)") {
		t.Error("a wrapper that gives advice does not count")
	}
	if !covered("`annotation …: delivery N: cert_dir \"…\" must be absolute` / `must not contain '..'`", fragments("cert_dir %q must not contain '..'")) {
		t.Error("a row quoting the message abridged is not seen as covering it")
	}
}
