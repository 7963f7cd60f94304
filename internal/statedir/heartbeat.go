package statedir

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// HeartbeatPath is the file whose modification time tells when a refresher
// last served the state directory. It is empty: only its time counts. It
// outlives the refresher on purpose, so that a hook can tell a refresher
// restarting (a rolling update, a systemd restart) from one gone for good.
func (s Store) HeartbeatPath() string { return filepath.Join(s.Dir, "refresher.alive") }

// Heartbeat marks now as a moment a refresher served the state directory.
func (s Store) Heartbeat(now time.Time) error {
	p := s.HeartbeatPath()
	err := os.Chtimes(p, now, now)
	if errors.Is(err, fs.ErrNotExist) {
		var f *os.File
		if f, err = os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o600); err == nil {
			f.Close()
			err = os.Chtimes(p, now, now)
		} else if errors.Is(err, fs.ErrExist) {
			err = os.Chtimes(p, now, now)
		}
	}
	if err != nil {
		return fmt.Errorf("refresher heartbeat: %w", err)
	}
	return nil
}

// LastHeartbeat returns when a refresher last served the state directory;
// an error wrapping fs.ErrNotExist if none ever did.
func (s Store) LastHeartbeat() (time.Time, error) {
	st, err := os.Stat(s.HeartbeatPath())
	if err != nil {
		return time.Time{}, err
	}
	return st.ModTime(), nil
}
