package daemon

import (
	"context"
	"log/slog"
	"os"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
)

// reloads rereads the node configuration on SIGHUP. A bad one is refused
// and the one in force stays; streams and files are never touched.
type reloads struct {
	load  func() (config.Config, error)
	apply func(config.Config) error
	// counted reports every reload's outcome (the reload metrics).
	counted  func(error)
	setLevel func(config.Config)
	level    slog.Leveler
	log      *slog.Logger
	path     string
}

// run reloads once per signal on hup until ctx ends.
func (l reloads) run(ctx context.Context, hup <-chan os.Signal) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			l.reload()
		}
	}
}

// reload reads the configuration and puts it in force, logging one line
// either way; the error is the reason it was refused.
func (l reloads) reload() error {
	next, err := l.load()
	if err == nil {
		err = l.apply(next)
	}
	l.counted(err)
	if err != nil {
		l.log.Error("configuration reload refused; the running configuration stays in force", logkey.Error, err)
		return err
	}
	l.setLevel(next)
	l.log.Info("configuration reloaded", "config", l.path, "log_level", l.level.Level().String(), logkey.AgentSocket, next.NodeAgentSocket())
	return nil
}
