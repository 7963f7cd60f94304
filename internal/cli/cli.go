// Package cli is what the project's commands do alike before their work:
// parse flags and answer --version.
package cli

import (
	"errors"
	"flag"
	"fmt"
)

// Parse adds --version to fs and parses args. When the command should stop
// here (--help, a bad flag, --version) it returns done and the exit code.
func Parse(fs *flag.FlagSet, args []string, version string) (code int, done bool) {
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0, true
		}
		return 2, true
	}
	if *showVersion {
		fmt.Fprintln(fs.Output(), fs.Name(), version)
		return 0, true
	}
	return 0, false
}
