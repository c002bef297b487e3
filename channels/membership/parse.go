package membership

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/tcpproxy/tcpproxy/channels"
	"gopkg.in/yaml.v3"
)

// MaxFileSize bounds a member file, so that a runaway file cannot exhaust
// memory.
const MaxFileSize = 16 << 20

// maxNameLen matches the wire format's one-byte length prefix.
const maxNameLen = 255

// Parse decodes a YAML member list:
//
//	members:
//	  - iid: a-1
//	    role: frontend
//	    addr: 127.0.0.1:7001
//	    channels: {peers: 2380}
//
// Every member needs a unique iid and an addr (host:port); channel ports are
// 1-65535. Errors name the line and what is wrong; unknown fields are
// errors too, so that a typo does not silently drop a setting.
func Parse(data []byte) (members []channels.Member, err error) {
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("size %d exceeds %d bytes", len(data), MaxFileSize)
	}
	// The YAML decoder has panicked on malformed input in past releases;
	// a bad file must be an error, never a crash of the proxy.
	defer func() {
		if r := recover(); r != nil {
			members, err = nil, fmt.Errorf("yaml: %v", r)
		}
	}()
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, err
	}
	if doc.Kind == 0 { // empty file
		return []channels.Member{}, nil
	}
	root := resolve(&doc)
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) == 0 {
			return []channels.Member{}, nil
		}
		root = resolve(root.Content[0])
	}
	if isNull(root) {
		return []channels.Member{}, nil
	}
	if root.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("line %d: top level must be a mapping with a members list", root.Line)
	}
	var list *yaml.Node
	if err := fields(root, func(key string, v *yaml.Node) error {
		if key != "members" {
			return fmt.Errorf("unknown field %q (want members)", key)
		}
		list = v
		return nil
	}); err != nil {
		return nil, err
	}
	members = []channels.Member{}
	if list == nil || isNull(list) {
		return members, nil
	}
	if list.Kind != yaml.SequenceNode {
		return nil, fmt.Errorf("line %d: members must be a list", list.Line)
	}
	var errs []error
	firstLine := make(map[string]int)
	for _, item := range list.Content {
		item = resolve(item)
		m, err := parseMember(item)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if first, dup := firstLine[m.IID]; dup {
			errs = append(errs, fmt.Errorf("line %d: duplicate iid %q (first at line %d)", item.Line, m.IID, first))
			continue
		}
		firstLine[m.IID] = item.Line
		members = append(members, m)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return members, nil
}

func parseMember(n *yaml.Node) (channels.Member, error) {
	if n.Kind != yaml.MappingNode {
		return channels.Member{}, fmt.Errorf("line %d: a member must be a mapping with iid, role, addr, channels", n.Line)
	}
	var m channels.Member
	err := fields(n, func(key string, v *yaml.Node) error {
		switch key {
		case "iid", "role", "addr":
			s, err := scalar(key, v)
			if err != nil {
				return err
			}
			switch key {
			case "iid":
				m.IID = s
			case "role":
				m.Role = s
			default:
				m.Addr = s
			}
		case "channels":
			chans, err := parseChannels(v)
			if err != nil {
				return err
			}
			m.Channels = chans
		default:
			return fmt.Errorf("unknown field %q (want iid, role, addr, channels)", key)
		}
		return nil
	})
	if err != nil {
		return channels.Member{}, err
	}
	if err := ValidateMember(m, true); err != nil {
		return channels.Member{}, fmt.Errorf("line %d: %w", n.Line, err)
	}
	if m.Channels == nil {
		m.Channels = map[string]uint16{}
	}
	return m, nil
}

func parseChannels(n *yaml.Node) (map[string]uint16, error) {
	n = resolve(n)
	chans := map[string]uint16{}
	if isNull(n) {
		return chans, nil
	}
	if n.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("line %d: channels must be a mapping of channel name to port", n.Line)
	}
	err := fields(n, func(name string, v *yaml.Node) error {
		switch {
		case name == "":
			return errors.New("empty channel name")
		case len(name) > maxNameLen:
			return fmt.Errorf("channel name length %d exceeds %d", len(name), maxNameLen)
		}
		s, err := scalar("channel "+strconv.Quote(name)+" port", v)
		if err != nil {
			return err
		}
		p, err := strconv.ParseUint(s, 10, 16)
		if err != nil || p == 0 {
			return fmt.Errorf("channel %q: port %q must be 1-65535", name, s)
		}
		chans[name] = uint16(p)
		return nil
	})
	return chans, err
}

// fields calls f for each key of a mapping, refusing duplicate and
// non-scalar keys; f's errors get the line of the offending entry.
func fields(n *yaml.Node, f func(key string, v *yaml.Node) error) error {
	seen := make(map[string]int)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := resolve(n.Content[i]), resolve(n.Content[i+1])
		if k.Kind != yaml.ScalarNode {
			return fmt.Errorf("line %d: keys must be plain names", k.Line)
		}
		if first, dup := seen[k.Value]; dup {
			return fmt.Errorf("line %d: %q given twice (first at line %d)", k.Line, k.Value, first)
		}
		seen[k.Value] = k.Line
		if err := f(k.Value, v); err != nil {
			var le *lineError
			if errors.As(err, &le) {
				return err // already points at a nested line
			}
			return &lineError{line: k.Line, err: err}
		}
	}
	return nil
}

func scalar(what string, n *yaml.Node) (string, error) {
	if n.Kind != yaml.ScalarNode || isNull(n) {
		return "", fmt.Errorf("%s must be a single value", what)
	}
	return n.Value, nil
}

// resolve follows aliases (bounded, in case of a cycle).
func resolve(n *yaml.Node) *yaml.Node {
	for i := 0; n != nil && n.Kind == yaml.AliasNode && n.Alias != nil && i < 100; i++ {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.Tag == "!!null"
}

// lineError is an error located at a line of the file.
type lineError struct {
	line int
	err  error
}

func (e *lineError) Error() string { return fmt.Sprintf("line %d: %v", e.line, e.err) }
func (e *lineError) Unwrap() error { return e.err }
