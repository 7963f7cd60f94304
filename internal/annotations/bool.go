package annotations

import (
	"fmt"

	"gopkg.in/yaml.v3"
)

// Bool is a boolean field that takes a YAML boolean (true or false, in
// YAML 1.2's spellings) and nothing else. A plain bool field would also
// take yaml.v3's YAML 1.1 leftovers (on, off, yes, no, y, n), and an
// annotation that says `include_federated_domains: "on"` or `: no` is
// more likely a mistake than a choice: it is refused with the field's
// name, as the docs say.
type Bool bool

// UnmarshalYAML accepts only a scalar that YAML resolves to !!bool. A
// refusal is a *yaml.TypeError, worded as yaml.v3's own, so that it reads
// like the refusal of any other mistyped field.
func (b *Bool) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: cannot unmarshal %s into bool: write true or false", n.Line, n.ShortTag())}}
	}
	if n.ShortTag() != "!!bool" {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: cannot unmarshal %s `%s` into bool: write true or false", n.Line, n.ShortTag(), printableOr(n.Value))}}
	}
	var v bool
	if err := n.Decode(&v); err != nil {
		return err
	}
	*b = Bool(v)
	return nil
}
