package hook

import (
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// DirectName is the binary that asks the agent itself, installed beside
// spiffe-oci-hook.
const DirectName = "spiffe-oci-hook-direct"

// ExecDirect replaces this process with spiffe-oci-hook-direct from the
// same directory, run with args and with state on its stdin, as the
// runtime ran this one. It returns only if it could not.
func ExecDirect(args []string, state []byte) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	path := filepath.Join(filepath.Dir(self), DirectName)
	// The state goes to a memory file rather than a pipe, which would
	// block once full with no reader yet.
	fd, err := unix.MemfdCreate("oci-state", unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("memfd for the OCI state: %w", err)
	}
	f := os.NewFile(uintptr(fd), "oci-state")
	defer f.Close()
	if _, err := f.Write(state); err != nil {
		return fmt.Errorf("memfd for the OCI state: %w", err)
	}
	if _, err := f.Seek(0, 0); err != nil {
		return fmt.Errorf("memfd for the OCI state: %w", err)
	}
	// dup3 without O_CLOEXEC: stdin survives the exec.
	if err := unix.Dup3(fd, 0, 0); err != nil {
		return fmt.Errorf("memfd for the OCI state: %w", err)
	}
	if err := unix.Exec(path, append([]string{path}, args...), os.Environ()); err != nil {
		return fmt.Errorf("exec %s: %w", path, err)
	}
	return nil
}
