package ocistate

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

const goodState = `{"ociVersion":"1.2.0","id":"abc123","status":"created","pid":4242,"bundle":"/run/containers/abc123/userdata","annotations":{"identity.noderesource.dev/container":"- cert_dir: /var/certs\n"}}`

func TestParseStateGood(t *testing.T) {
	s, err := ParseState([]byte(goodState))
	if err != nil {
		t.Fatal(err)
	}
	if s.ID != "abc123" || s.Pid != 4242 || s.Bundle != "/run/containers/abc123/userdata" || s.Status != specs.StateCreated {
		t.Fatalf("ParseState() = %+v", s)
	}
	if got := s.Annotations["identity.noderesource.dev/container"]; got != "- cert_dir: /var/certs\n" {
		t.Fatalf("annotation = %q", got)
	}
	if Stopped(s) {
		t.Fatal("Stopped(created state) = true")
	}
}

func TestReadState(t *testing.T) {
	s, err := ReadState(strings.NewReader(goodState))
	if err != nil || s.ID != "abc123" {
		t.Fatalf("ReadState() = %+v, %v", s, err)
	}
	big := bytes.Repeat([]byte(" "), maxStateSize+1)
	if _, err := ReadState(bytes.NewReader(big)); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("ReadState(oversized) error = %v", err)
	}
}

func TestParseStateErrors(t *testing.T) {
	tests := []struct {
		name  string
		state string
		want  string
	}{
		{"garbage", "not json", "not valid JSON"},
		{"empty input", "", "not valid JSON"},
		{"truncated", goodState[:len(goodState)/2], "not valid JSON"},
		{"wrong type", `{"id":1}`, "not valid JSON"},
		{"null", `null`, "container id is empty"},
		{"empty id", `{"id":"","pid":1,"bundle":"/b"}`, "container id is empty"},
		{"missing id", `{"pid":1,"bundle":"/b"}`, "container id is empty"},
		{"id with slash", `{"id":"a/b","pid":1,"bundle":"/b"}`, `container id "a/b" cannot be used as a file name`},
		{"id is ..", `{"id":"..","pid":1,"bundle":"/b"}`, "cannot be used as a file name"},
		{"id starting with dot", `{"id":".hidden","pid":1,"bundle":"/b"}`, `container id ".hidden" cannot be used as a file name`},
		{"id with NUL", `{"id":"a\u0000b","pid":1,"bundle":"/b"}`, "cannot be used as a file name"},
		{"id too long", `{"id":"` + strings.Repeat("a", 1025) + `","pid":1,"bundle":"/b"}`, "longer than 1024"},
		{"relative bundle", `{"id":"c1","pid":1,"bundle":"run/c1"}`, `OCI state of container c1: bundle "run/c1" is not an absolute path`},
		{"empty bundle", `{"id":"c1","pid":1}`, `bundle "" is not an absolute path`},
		{"negative pid", `{"id":"c1","pid":-5,"bundle":"/b"}`, "negative pid -5"},
		{"oversized", `{"id":"c1","pid":1,"bundle":"/b"}` + strings.Repeat(" ", maxStateSize), "larger than 4194304 bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := ParseState([]byte(tt.state))
			if err == nil {
				t.Fatalf("ParseState() = %+v, want error", s)
			}
			if s != nil {
				t.Errorf("state %+v returned with error", s)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %q does not contain %q", err, tt.want)
			}
		})
	}
}

func TestParseStateLimits(t *testing.T) {
	// An ID of exactly 1024 bytes and a state of exactly maxStateSize are fine.
	st := `{"id":"` + strings.Repeat("a", 1024) + `","pid":0,"bundle":"/b"}`
	st += strings.Repeat(" ", maxStateSize-len(st))
	s, err := ParseState([]byte(st))
	if err != nil {
		t.Fatal(err)
	}
	if len(s.ID) != 1024 || s.Pid != 0 {
		t.Fatalf("ParseState() = id of %d bytes, pid %d", len(s.ID), s.Pid)
	}
}

func TestStopped(t *testing.T) {
	for status, want := range map[specs.ContainerState]bool{
		specs.StateCreating: false,
		specs.StateCreated:  false,
		specs.StateRunning:  false,
		specs.StateStopped:  true,
		"":                  false,
	} {
		if got := Stopped(&specs.State{Status: status}); got != want {
			t.Errorf("Stopped(%q) = %v, want %v", status, got, want)
		}
	}
	s, err := ParseState([]byte(`{"id":"c1","status":"stopped","pid":0,"bundle":"/b"}`))
	if err != nil || !Stopped(s) {
		t.Fatalf("poststop state: %+v, %v", s, err)
	}
}

func writeConfig(t *testing.T, content string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestLoadSpec(t *testing.T) {
	spec := specs.Spec{
		Version:     "1.2.0",
		Root:        &specs.Root{Path: "rootfs"},
		Process:     &specs.Process{User: specs.User{UID: 1000, GID: 1000}, Args: []string{"/bin/sh"}, Cwd: "/"},
		Annotations: map[string]string{"k": "v"},
		Linux: &specs.Linux{
			UIDMappings: []specs.LinuxIDMapping{{ContainerID: 0, HostID: 100000, Size: 65536}},
			GIDMappings: []specs.LinuxIDMapping{{ContainerID: 0, HostID: 200000, Size: 65536}},
			MountLabel:  "system_u:object_r:container_file_t:s0:c1,c2",
		},
	}
	data, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	bundle := writeConfig(t, string(data))
	got, err := LoadSpec(bundle)
	if err != nil {
		t.Fatal(err)
	}
	// What the hook reads: root, the process user, the mappings, the mount
	// label and the annotations.
	if got.Root.Path != "rootfs" || got.Process.User.UID != 1000 || got.Process.User.GID != 1000 || got.Annotations["k"] != "v" ||
		got.Linux.MountLabel != spec.Linux.MountLabel || got.Linux.UIDMappings[0].HostID != 100000 || got.Linux.GIDMappings[0].HostID != 200000 {
		t.Fatalf("LoadSpec() = %+v", got)
	}
	if p := RootfsPath(bundle, got); p != filepath.Join(bundle, "rootfs") {
		t.Fatalf("RootfsPath() = %q", p)
	}
}

func TestLoadSpecErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope")
	if _, err := LoadSpec(missing); err == nil || !strings.Contains(err.Error(), "reading bundle config") || !os.IsNotExist(unwrapAll(err)) {
		t.Fatalf("missing bundle: error = %v", err)
	}
	tests := []struct {
		name, config, want string
	}{
		{"bad JSON", `{"root":`, "is not valid JSON"},
		{"not an object", `[]`, "is not valid JSON"},
		{"no root", `{"process":{"cwd":"/","user":{"uid":0,"gid":0}}}`, "has no root.path"},
		{"empty root path", `{"root":{"path":""},"process":{"cwd":"/","user":{"uid":0,"gid":0}}}`, "has no root.path"},
		{"no process", `{"root":{"path":"rootfs"}}`, "has no process"},
		{"null process", `{"root":{"path":"rootfs"},"process":null}`, "has no process"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bundle := writeConfig(t, tt.config)
			s, err := LoadSpec(bundle)
			if err == nil {
				t.Fatalf("LoadSpec() = %+v, want error", s)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %q does not contain %q", err, tt.want)
			}
			if !strings.Contains(err.Error(), filepath.Join(bundle, "config.json")) {
				t.Fatalf("error %q does not name the file", err)
			}
		})
	}
	t.Run("oversized", func(t *testing.T) {
		bundle := writeConfig(t, `{"root":{"path":"r"},"process":{}}`+strings.Repeat(" ", MaxConfigSize))
		if _, err := LoadSpec(bundle); err == nil || !strings.Contains(err.Error(), "larger than 16777216 bytes") {
			t.Fatalf("error = %v", err)
		}
	})
}

func unwrapAll(err error) error {
	for {
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			return err
		}
		next := u.Unwrap()
		if next == nil {
			return err
		}
		err = next
	}
}

func TestRootfsPath(t *testing.T) {
	tests := []struct {
		bundle, root, want string
	}{
		{"/run/b", "rootfs", "/run/b/rootfs"},
		{"/run/b", "./rootfs/", "/run/b/rootfs"},
		{"/run/b", "/var/lib/containers/merged", "/var/lib/containers/merged"},
		{"/run/b", "/var/lib//containers/./merged/", "/var/lib/containers/merged"},
	}
	for _, tt := range tests {
		got := RootfsPath(tt.bundle, &specs.Spec{Root: &specs.Root{Path: tt.root}})
		if got != tt.want {
			t.Errorf("RootfsPath(%q, %q) = %q, want %q", tt.bundle, tt.root, got, tt.want)
		}
	}
}

func FuzzParseState(f *testing.F) {
	f.Add([]byte(goodState))
	f.Add([]byte(`{"id":"c1","status":"stopped","pid":0,"bundle":"/b"}`))
	f.Add([]byte(`{"id":"a/b","pid":1,"bundle":"/b"}`))
	f.Add([]byte(`{"id":".x","pid":1,"bundle":"/b"}`))
	f.Add([]byte(`{"id":"c1","pid":-1,"bundle":"/b"}`))
	f.Add([]byte(`{"id":"c1","pid":1,"bundle":"rel"}`))
	f.Add([]byte(`null`))
	f.Add([]byte(``))
	f.Add([]byte("\xff\xfe"))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := ParseState(data)
		if err != nil {
			if s != nil {
				t.Fatalf("state %+v returned with error %v", s, err)
			}
			return
		}
		if err := ValidateID(s.ID); err != nil {
			t.Fatalf("accepted state with invalid id %q: %v", s.ID, err)
		}
		if s.ID == "" || strings.ContainsAny(s.ID, "/\x00") || strings.HasPrefix(s.ID, ".") || len(s.ID) > 1024 {
			t.Fatalf("accepted id %q", s.ID)
		}
		if !filepath.IsAbs(s.Bundle) {
			t.Fatalf("accepted relative bundle %q", s.Bundle)
		}
		if s.Pid < 0 {
			t.Fatalf("accepted pid %d", s.Pid)
		}
		// An ID that passed may become one path element and nothing more.
		if filepath.Base(filepath.Join("/state", s.ID)) != s.ID {
			t.Fatalf("id %q does not stay one path element", s.ID)
		}
	})
}
