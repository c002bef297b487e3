package main

import (
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// errEmptyConfig is returned for a file with no YAML document in it.
var errEmptyConfig = errors.New("the file is empty or holds only comments; a configuration needs at least iid, role, listen and channels")

// unknownFields walks the YAML tree n alongside the Go type t that it will
// be decoded into and returns one error per mapping key that t has no field
// for, named by its path in the file (channels.cache.prot) rather than by
// Go types, with the keys that would have been accepted.
func unknownFields(n *yaml.Node, t reflect.Type) []error {
	var errs []error
	walkYAML(n, t, "", func(path string, key *yaml.Node, known []string) {
		msg := fmt.Sprintf("%s (line %d): unknown field", path, key.Line)
		if len(known) > 0 {
			msg += "; expected one of " + strings.Join(known, ", ")
		}
		errs = append(errs, errors.New(msg))
	})
	return errs
}

// walkYAML calls unknown for every key of a mapping in n that the struct
// it decodes into does not have.
func walkYAML(n *yaml.Node, t reflect.Type, path string, unknown func(path string, key *yaml.Node, known []string)) {
	if n == nil {
		return
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if reflect.PointerTo(t).Implements(yamlUnmarshaler) {
		return // decodes itself and reports its own errors
	}
	switch n.Kind {
	case yaml.DocumentNode:
		for _, c := range n.Content {
			walkYAML(c, t, path, unknown)
		}
	case yaml.AliasNode:
		walkYAML(n.Alias, t, path, unknown)
	case yaml.MappingNode:
		switch t.Kind() {
		case reflect.Struct:
			fields := yamlFields(t)
			for i := 0; i+1 < len(n.Content); i += 2 {
				k, v := n.Content[i], n.Content[i+1]
				ft, ok := fields[k.Value]
				if !ok {
					if k.Value != "<<" { // merge keys are yaml's own
						unknown(joinPath(path, k.Value), k, sortedKeys(fields))
					}
					continue
				}
				walkYAML(v, ft, joinPath(path, k.Value), unknown)
			}
		case reflect.Map:
			for i := 0; i+1 < len(n.Content); i += 2 {
				walkYAML(n.Content[i+1], t.Elem(), joinPath(path, n.Content[i].Value), unknown)
			}
		}
	case yaml.SequenceNode:
		if t.Kind() == reflect.Slice || t.Kind() == reflect.Array {
			for i, c := range n.Content {
				walkYAML(c, t.Elem(), path+"["+strconv.Itoa(i)+"]", unknown)
			}
		}
	}
}

var yamlUnmarshaler = reflect.TypeFor[yaml.Unmarshaler]()

// yamlFields maps the keys yaml.v3 accepts for struct t to their types:
// the name in the yaml tag, or the lower-cased field name without one.
func yamlFields(t reflect.Type) map[string]reflect.Type {
	fields := make(map[string]reflect.Type, t.NumField())
	for f := range t.Fields() {
		if !f.IsExported() {
			continue
		}
		tag := f.Tag.Get("yaml")
		name, opts, _ := strings.Cut(tag, ",")
		switch {
		case name == "-":
			continue
		case strings.Contains(opts, "inline"):
			for k, v := range yamlFields(f.Type) {
				fields[k] = v
			}
			continue
		case name == "":
			name = strings.ToLower(f.Name)
		}
		fields[name] = f.Type
	}
	return fields
}

func sortedKeys(m map[string]reflect.Type) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func joinPath(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// typeErrorLine matches one of yaml.v3's decode errors: "line 5: cannot
// unmarshal !!str `abc` into int".
var typeErrorLine = regexp.MustCompile("^line (\\d+): cannot unmarshal !!(\\w+)(?: `(.*)`)? into (\\S+)$")

// explainTypeErrors rewrites yaml.v3's type errors, which name Go types,
// into the path of the value and what was expected.
func explainTypeErrors(root *yaml.Node, err error) error {
	paths := valuePaths(root)
	if ve, ok := errors.AsType[*valueError](err); ok {
		if p := paths[lineValue{ve.Line, ve.Value}]; len(p) == 1 {
			ve.Path = p[0]
		}
		return ve
	}
	te, ok := errors.AsType[*yaml.TypeError](err)
	if !ok {
		return err
	}
	out := make([]error, 0, len(te.Errors))
	for _, e := range te.Errors {
		m := typeErrorLine.FindStringSubmatch(e)
		if m == nil {
			out = append(out, errors.New(e))
			continue
		}
		line, _ := strconv.Atoi(m[1])
		where := fmt.Sprintf("line %d", line)
		if p := paths[lineValue{line, m[3]}]; len(p) == 1 && m[3] != "" {
			where = fmt.Sprintf("%s (line %d)", p[0], line)
		}
		what := fmt.Sprintf("%q", m[3])
		switch m[2] {
		case "map":
			what = "a mapping"
		case "seq":
			what = "a list"
		}
		out = append(out, fmt.Errorf("%s: %s is not %s", where, what, goTypeInWords(m[4])))
	}
	return errors.Join(out...)
}

type lineValue struct {
	line  int
	value string
}

// valuePaths indexes every scalar value of the tree by its line and text.
func valuePaths(n *yaml.Node) map[lineValue][]string {
	paths := make(map[lineValue][]string)
	var walk func(n *yaml.Node, path string)
	walk = func(n *yaml.Node, path string) {
		switch n.Kind {
		case yaml.DocumentNode:
			for _, c := range n.Content {
				walk(c, path)
			}
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				walk(n.Content[i+1], joinPath(path, n.Content[i].Value))
			}
		case yaml.SequenceNode:
			for i, c := range n.Content {
				walk(c, path+"["+strconv.Itoa(i)+"]")
			}
		case yaml.ScalarNode:
			k := lineValue{n.Line, n.Value}
			paths[k] = append(paths[k], path)
		}
	}
	walk(n, "")
	return paths
}

// goTypeInWords says what a Go type expects of a YAML value.
func goTypeInWords(t string) string {
	switch {
	case t == "bool":
		return "true or false"
	case t == "string":
		return "a string"
	case t == "time.Duration":
		return durationWords
	case strings.HasPrefix(t, "uint8"):
		return "a whole number from 0 to 255"
	case strings.HasPrefix(t, "uint16"):
		return "a whole number from 0 to 65535"
	case strings.HasPrefix(t, "uint"):
		return "a whole number of 0 or more"
	case strings.HasPrefix(t, "int"):
		return "a whole number"
	case strings.HasPrefix(t, "float"):
		return "a number"
	case strings.HasPrefix(t, "[]"):
		return "a list"
	case strings.HasPrefix(t, "map["):
		return "a mapping of names to values"
	}
	return "the expected kind of value"
}
