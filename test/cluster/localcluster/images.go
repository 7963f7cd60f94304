package localcluster

import (
	"archive/tar"
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Images built offline (no registry is reachable): a root filesystem
// written as a tarball and imported with Podman, then loaded into CRI-O's
// store (the same containers-storage) or saved and imported into
// containerd with ctr.
const (
	// BusyboxImage is the image test pods run: Debian's busybox-static.
	BusyboxImage = "localhost/spiffe-oci-hook-test/busybox:cluster"
	// PauseImage is the runtimes' sandbox image: the same busybox, whose
	// CMD sleeps.
	PauseImage = "localhost/spiffe-oci-hook-test/pause:cluster"
	// SPIREImage holds spire-server and spire-agent 1.15.3 (test/spire115,
	// the version SPIRE's Helm chart 0.30.0 ships) and
	// spire-controller-manager v0.7.0 (test/spire-controller-manager).
	SPIREImage = "localhost/spiffe-oci-hook-test/spire:" + SPIREVersion
	// ProjectImage is deploy/Containerfile's layout, built from bin/.
	ProjectImage = "localhost/spiffe-oci-hook:dev"
	// SpiffeHelperImage is busybox with spiffe-helper at
	// /usr/bin/spiffe-helper (Options.SpiffeHelperBin), for make bench.
	SpiffeHelperImage = "localhost/spiffe-oci-hook-test/spiffe-helper:cluster"
	// ReleaseImage is the tag the kustomize overlays name: the same local
	// image, so that `kubectl apply -k` of an unmodified overlay finds it
	// (imagePullPolicy IfNotPresent) without a registry.
	ReleaseImage = "ghcr.io/noderesource/spiffe-oci-hook:latest"
	// UpgradeImage and UpgradeReleaseImage are the same layout built from
	// binaries that report UpgradeVersion: the release a test upgrades to
	// (Helm sets the tag, kustomize rewrites the release image's tag).
	UpgradeImage        = "localhost/spiffe-oci-hook:upgrade"
	UpgradeReleaseImage = "ghcr.io/noderesource/spiffe-oci-hook:upgrade"
)

// SPIREVersion is the SPIRE the cluster runs: Options.SPIREBinDir's
// binaries must report it.
const SPIREVersion = "1.15.3"

// UpgradeVersion is the version UpgradeImage's binaries print.
const UpgradeVersion = "v0.0.0-cluster-upgrade"

// ProjectFiles is where the project image holds each binary: the
// destinations of deploy/Containerfile's COPY lines (a test compares them).
var ProjectFiles = map[string]string{
	"/usr/bin/spiffe-oci-hook":               "bin/spiffe-oci-hook",
	"/usr/bin/spiffe-oci-hook-direct":        "bin/spiffe-oci-hook-direct",
	"/usr/bin/spiffe-oci-refresher":          "bin/spiffe-oci-refresher",
	"/usr/bin/spiffe-oci-nri":                "bin/spiffe-oci-nri",
	"/usr/share/doc/spiffe-oci-hook/LICENSE": "LICENSE",
}

// ProjectEntrypoint is deploy/Containerfile's ENTRYPOINT.
const ProjectEntrypoint = "/usr/bin/spiffe-oci-refresher"

const imagePath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// rootfs is a tarball under construction.
type rootfs struct {
	tw   *tar.Writer
	dirs map[string]bool
}

func newRootfs(w io.Writer) *rootfs {
	r := &rootfs{tw: tar.NewWriter(w), dirs: map[string]bool{}}
	for _, d := range []string{"/bin", "/dev", "/etc", "/proc", "/sys", "/run", "/var", "/root", "/usr/bin", "/usr/sbin"} {
		r.dir(d, 0o755)
	}
	r.dir("/tmp", 0o1777)
	r.data("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", 0o644)
	r.data("/etc/group", "root:x:0:\nnobody:x:65534:\n", 0o644)
	return r
}

func (r *rootfs) dir(p string, mode int64) {
	if p == "/" || r.dirs[p] {
		return
	}
	r.dir(filepath.Dir(p), 0o755)
	r.dirs[p] = true
	r.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: "." + p + "/", Mode: mode})
}

func (r *rootfs) data(p, content string, mode int64) {
	r.dir(filepath.Dir(p), 0o755)
	r.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "." + p, Mode: mode, Size: int64(len(content))})
	io.WriteString(r.tw, content)
}

func (r *rootfs) file(p, src string, mode int64) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	r.dir(filepath.Dir(p), 0o755)
	if err := r.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "." + p, Mode: mode, Size: fi.Size()}); err != nil {
		return err
	}
	_, err = io.Copy(r.tw, f)
	return err
}

func (r *rootfs) symlink(p, target string) {
	r.dir(filepath.Dir(p), 0o755)
	r.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: "." + p, Linkname: target, Mode: 0o777})
}

// busybox adds Debian's busybox-static as /bin/busybox with a link for
// every applet, as the busybox image has.
func (r *rootfs) busybox() error {
	if err := r.file("/bin/busybox", "/bin/busybox", 0o755); err != nil {
		return fmt.Errorf("busybox-static is missing (test/deps.sh): %w", err)
	}
	out, err := exec.Command("/bin/busybox", "--list").Output()
	if err != nil {
		return fmt.Errorf("busybox --list: %w", err)
	}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		if a := strings.TrimSpace(sc.Text()); a != "" && a != "busybox" {
			r.symlink("/bin/"+a, "busybox")
		}
	}
	return nil
}

// sharedLibs adds the shared libraries bin links (ldd), at the same
// paths, so that a cgo binary of the host runs in the image.
func (r *rootfs) sharedLibs(bin string) error {
	out, err := exec.Command("ldd", bin).Output()
	if err != nil {
		// "not a dynamic executable": nothing to add.
		return nil
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		var lib string
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			lib = f[2]
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			lib = f[0]
		default:
			continue
		}
		if r.dirs["lib:"+lib] {
			continue
		}
		r.dirs["lib:"+lib] = true
		real, err := filepath.EvalSymlinks(lib)
		if err != nil {
			return err
		}
		if err := r.file(lib, real, 0o755); err != nil {
			return err
		}
	}
	return nil
}

func (r *rootfs) close() error { return r.tw.Close() }

// image is one image to build: its rootfs and its config.
type image struct {
	names   []string
	changes []string
	fill    func(*rootfs) error
}

func (c *Cluster) images() []image {
	imgs := c.baseImages()
	if c.SpiffeHelperBin != "" {
		imgs = append(imgs, image{
			names:   []string{SpiffeHelperImage},
			changes: []string{"ENV " + imagePath},
			fill: func(r *rootfs) error {
				if err := r.busybox(); err != nil {
					return err
				}
				r.dir("/tmp", 0o1777) // for its configuration
				if err := r.file("/usr/bin/spiffe-helper", c.SpiffeHelperBin, 0o755); err != nil {
					return fmt.Errorf("spiffe-helper image: %w", err)
				}
				return r.sharedLibs(c.SpiffeHelperBin)
			},
		})
	}
	return imgs
}

// baseImages are the images every cluster runs.
func (c *Cluster) baseImages() []image {
	spireBin := func(name string) string { return filepath.Join(c.SPIREBinDir, name) }
	return []image{
		{
			names:   []string{BusyboxImage, PauseImage},
			changes: []string{"ENV " + imagePath, `CMD ["/bin/sleep", "2147483647"]`},
			fill:    func(r *rootfs) error { return r.busybox() },
		},
		c.projectImage(c.RepoRoot, ProjectImage, ReleaseImage),
		c.projectImage(c.upgradeRoot(), UpgradeImage, UpgradeReleaseImage),
		{
			names:   []string{SPIREImage},
			changes: []string{"ENV " + imagePath},
			fill: func(r *rootfs) error {
				if err := r.busybox(); err != nil {
					return err
				}
				out, err := exec.Command(spireBin("spire-server"), "--version").CombinedOutput()
				if v := strings.TrimSpace(string(out)); err != nil || !strings.HasPrefix(v, SPIREVersion) {
					return fmt.Errorf("SPIRE image: %s --version: %q, %v; want SPIRE %s (make spire: bin/test/spire-1.15)", spireBin("spire-server"), v, err, SPIREVersion)
				}
				for _, b := range []string{"spire-server", "spire-agent"} {
					if err := r.file("/usr/bin/"+b, spireBin(b), 0o755); err != nil {
						return fmt.Errorf("SPIRE image: %w (make spire)", err)
					}
					if err := r.sharedLibs(spireBin(b)); err != nil {
						return err
					}
				}
				scm := filepath.Join(c.ToolDir, "spire-controller-manager")
				if err := r.file("/usr/bin/spire-controller-manager", scm, 0o755); err != nil {
					return fmt.Errorf("SPIRE image: %w (make cluster-tools)", err)
				}
				return r.sharedLibs(scm)
			},
		},
	}
}

// projectImage is deploy/Containerfile's layout with the binaries of
// root/bin.
func (c *Cluster) projectImage(root string, names ...string) image {
	return image{
		names:   names,
		changes: []string{"ENV " + imagePath, fmt.Sprintf(`ENTRYPOINT [%q]`, ProjectEntrypoint)},
		fill: func(r *rootfs) error {
			if err := r.busybox(); err != nil {
				return err
			}
			for dst, src := range ProjectFiles {
				mode := int64(0o755)
				if strings.HasPrefix(dst, "/usr/share") {
					mode = 0o644
				}
				from := filepath.Join(root, src)
				if src == "LICENSE" {
					from = filepath.Join(c.RepoRoot, src)
				}
				if err := r.file(dst, from, mode); err != nil {
					return fmt.Errorf("project image: %w (make build)", err)
				}
			}
			return nil
		},
	}
}

// upgradeRoot is where buildUpgradeBinaries puts bin/.
func (c *Cluster) upgradeRoot() string { return filepath.Join(c.Dir, "upgrade") }

// buildUpgradeBinaries builds the project's binaries as the Makefile does
// but stamped UpgradeVersion (a link from the build cache after make build).
func (c *Cluster) buildUpgradeBinaries() error {
	for _, b := range []string{"spiffe-oci-hook:./hook", "spiffe-oci-hook-direct:./hook/direct", "spiffe-oci-refresher:./refresher", "spiffe-oci-nri:./nri"} {
		name, pkg, _ := strings.Cut(b, ":")
		cmd := exec.Command("go", "build", "-trimpath", "-tags", "grpcnotrace",
			"-ldflags", "-s -w -X main.version="+UpgradeVersion, "-o", filepath.Join(c.upgradeRoot(), "bin", name), pkg)
		cmd.Dir = c.RepoRoot
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build %s (version %s): %v\n%s", pkg, UpgradeVersion, err, out)
		}
	}
	return nil
}

// podman runs podman on the store at root (never the host's).
func (c *Cluster) podman(root string, args ...string) error {
	base := []string{"--root", root, "--runroot", root + "-run", "--storage-driver", "overlay",
		"--tmpdir", filepath.Join(c.Dir, "podman-tmp"), "--events-backend", "none", "--cgroup-manager", "cgroupfs"}
	out, err := exec.Command("podman", append(base, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("podman %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// buildImages imports every image into the containers-storage at root.
func (c *Cluster) buildImages(root string) error {
	os.MkdirAll(filepath.Join(c.Dir, "podman-tmp"), 0o700)
	if err := c.buildUpgradeBinaries(); err != nil {
		return err
	}
	for _, img := range c.images() {
		tarball := filepath.Join(c.Dir, "rootfs.tar")
		f, err := os.Create(tarball)
		if err != nil {
			return err
		}
		r := newRootfs(f)
		err = img.fill(r)
		if err == nil {
			err = r.close()
		}
		f.Close()
		if err != nil {
			return err
		}
		args := []string{"import"}
		for _, ch := range img.changes {
			args = append(args, "--change", ch)
		}
		if err := c.podman(root, append(args, tarball, img.names[0])...); err != nil {
			return err
		}
		for _, n := range img.names[1:] {
			if err := c.podman(root, "tag", img.names[0], n); err != nil {
				return err
			}
		}
		os.Remove(tarball)
	}
	return nil
}

// allImageNames lists every image name buildImages makes.
func (c *Cluster) allImageNames() []string {
	var names []string
	for _, img := range c.images() {
		names = append(names, img.names...)
	}
	return names
}
