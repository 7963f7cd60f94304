// Package docs keeps the reference pages under docs/ equal to the code:
// every key the configuration and annotation parsers accept is documented,
// every documented key is accepted, and every error line the hook can
// print has a troubleshooting entry. The keys and the lines are read from
// the code itself (the parsers' yaml struct tags, the hook's error
// messages), so a new key or a new message fails here until it is
// documented. No root needed; about a second.
package docs

import (
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
)

// repoRoot is the repository, two levels up from this package.
const repoRoot = "../.."

func readDoc(t *testing.T, name string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(repoRoot, "docs", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// yamlKeys returns the yaml keys of struct type typ, nested structs
// (not slices of them) as prefix.key, as yaml.v3 decodes them.
func yamlKeys(typ reflect.Type, prefix string) []string {
	var keys []string
	for i := range typ.NumField() {
		f := typ.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" || !f.IsExported() {
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		if f.Type.Kind() == reflect.Struct && f.Type.PkgPath() != "time" {
			keys = append(keys, yamlKeys(f.Type, prefix+name+".")...)
			continue
		}
		keys = append(keys, prefix+name)
	}
	return keys
}

// tableKeys returns the code span that opens the first cell of each row of
// the markdown table whose header row starts with header ("| key |").
// Rows whose first cell is empty are left out.
func tableKeys(t *testing.T, doc, header string) []string {
	t.Helper()
	lines := strings.Split(doc, "\n")
	start := slices.IndexFunc(lines, func(l string) bool { return strings.HasPrefix(l, header) })
	if start < 0 {
		t.Fatalf("no table with header %q", header)
	}
	var keys []string
	for _, l := range lines[start+2:] {
		if !strings.HasPrefix(l, "|") {
			break
		}
		cell := strings.TrimSpace(strings.Split(l, "|")[1])
		if cell == "" {
			continue
		}
		m := regexp.MustCompile("^`([^`]+)`").FindStringSubmatch(cell)
		if m == nil {
			t.Errorf("table %q: row %q does not start with a `key`", header, l)
			continue
		}
		keys = append(keys, m[1])
	}
	return keys
}

// sameKeys fails t for each key of accepted that documented lacks
// (undocumented, a format for the key) and each key of documented that
// accepted lacks (unknown, likewise).
func sameKeys(t *testing.T, accepted, documented []string, undocumented, unknown string) {
	t.Helper()
	for _, k := range accepted {
		if !slices.Contains(documented, k) {
			t.Errorf(undocumented, k)
		}
	}
	for _, k := range documented {
		if !slices.Contains(accepted, k) {
			t.Errorf(unknown, k)
		}
	}
}

// TestConfigurationReference: docs/configuration.md's table lists exactly
// the keys config.Parse accepts.
func TestConfigurationReference(t *testing.T) {
	accepted := yamlKeys(reflect.TypeOf(config.Config{}), "")
	documented := tableKeys(t, readDoc(t, "configuration.md"), "| key |")
	sameKeys(t, accepted, documented,
		"config key %s is accepted by config.Parse but not documented in docs/configuration.md",
		"docs/configuration.md documents %s, which is not a config key")
	for _, k := range documented {
		// And the parser itself takes it: a key it did not know would be
		// refused as "field … not found".
		if _, err := config.Parse([]byte(nested(k, "null"))); err != nil && strings.Contains(err.Error(), "not found") {
			t.Errorf("docs/configuration.md documents %s; config.Parse refuses it: %v", k, err)
		}
	}
	if len(accepted) < 5 {
		t.Fatalf("found only %d config keys by reflection: %q", len(accepted), accepted)
	}
}

// nested renders key a.b: value as YAML.
func nested(key, value string) string {
	parts := strings.Split(key, ".")
	var b strings.Builder
	for i, p := range parts {
		b.WriteString(strings.Repeat("  ", i) + p + ":")
		if i == len(parts)-1 {
			b.WriteString(" " + value)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// TestAnnotationReference: docs/annotations.md's field table lists exactly
// the fields of a delivery, its text names every field of a jwt_svids item,
// and it names the annotation key.
func TestAnnotationReference(t *testing.T) {
	doc := readDoc(t, "annotations.md")
	accepted := yamlKeys(reflect.TypeOf(annotations.Delivery{}), "")
	documented := tableKeys(t, doc, "| field |")
	sameKeys(t, accepted, documented,
		"annotation field %s is accepted by annotations.Parse but not documented in docs/annotations.md's field table",
		"docs/annotations.md documents field %s, which is not a delivery field")
	for _, k := range documented {
		value := "- cert_dir: /certs\n  " + k + ": null\n"
		if _, err := annotations.Parse(annotations.Key, value); err != nil && strings.Contains(err.Error(), "not found") {
			t.Errorf("docs/annotations.md documents %s; annotations.Parse refuses it: %v", k, err)
		}
	}
	// The fields of a jwt_svids item are documented inside the jwt_svids
	// row; each must be named there, and Parse must know it.
	jwtRow := ""
	for _, l := range strings.Split(doc, "\n") {
		if strings.HasPrefix(l, "| `jwt_svids` |") {
			jwtRow = l
		}
	}
	for _, k := range yamlKeys(reflect.TypeOf(annotations.JWTSVID{}), "") {
		if !regexp.MustCompile(`\b` + k + `\b`).MatchString(jwtRow) {
			t.Errorf("jwt_svids item field %s is not named in docs/annotations.md's jwt_svids row", k)
		}
	}
	for _, k := range []string{annotations.Key, annotations.Key + ".<name>"} {
		if !strings.Contains(doc, "`"+k+"`") {
			t.Errorf("docs/annotations.md does not name the annotation key %s", k)
		}
	}
}
